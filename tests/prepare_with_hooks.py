"""`python -m planktonio prepare` with small journal parts and a hold, so a test can stop it at a known point.

    PART_IMAGES=8 HOLD_AFTER_PARTS=2 HOLD_FILE=F python -m tests.prepare_with_hooks prepare --source S --out O

Journal parts of PART_IMAGES positions (chunks of 4 files); after HOLD_AFTER_PARTS parts are written, the
process writes its pid to HOLD_FILE and waits there forever: the test signals it then (SIGTERM, SIGKILL),
with parts done and parts to do, as a prepare of a million images stopped at 80% would be.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from planktonio import inspection

inspection.PART_IMAGES = int(os.environ.get("PART_IMAGES", "8"))
inspection.CHUNK_IMAGES = 4
HOLD_AFTER = int(os.environ.get("HOLD_AFTER_PARTS", "0"))
_write = inspection.Journal.write
_written = []


def write_then_hold(self, number, *args):
    _write(self, number, *args)
    _written.append(number)
    if HOLD_AFTER and len(_written) == HOLD_AFTER:
        Path(os.environ["HOLD_FILE"]).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


inspection.Journal.write = write_then_hold

if __name__ == "__main__":
    from planktonio.__main__ import main
    sys.exit(main(sys.argv[1:]))

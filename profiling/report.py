"""`python -m profiling report RESULTS... --out DIR`: one markdown report with tables and plots.

Reads the JSON that `loaders`, `amp`, `inspect --json` and `suite` (suite.json:
what ran; training.json: the end-to-end runs) write, and writes DIR/report.md
with a PNG per chart beside it. Each kind of result renders its own section
(profiling/render/); every section names the machine and software it was
measured with, and the performance goals are checked against what was
measured, saying by how much a missed goal was missed. Imports no torch: a
report can be made from results on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic

from .render import SECTIONS


def load_results(paths: list[Path]) -> list[tuple[Path, dict]]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanktonioError(f"result {path}: cannot be read ({error})") from None
        if not isinstance(result, dict) or result.get("kind") not in SECTIONS:
            kind = result.get("kind") if isinstance(result, dict) else None
            raise PlanktonioError(f"result {path}: not a profiling result (kind {kind!r}; known: "
                                  f"{', '.join(SECTIONS)})")
        results.append((Path(path), result))
    return results


def write_report(paths: list[Path], out: Path, title: str = "planktonio measurements") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body, goals = [], []
    for index, (source, result) in enumerate(load_results(paths)):
        section = SECTIONS[result["kind"]](index, source, result, out)
        body += section.lines
        goals += section.goals
    text = [f"# {title}", ""]
    if goals:
        text += ["## Goals", "", *goals, ""]
    report = out / "report.md"
    write_atomic(report, "\n".join(text + body))
    return report

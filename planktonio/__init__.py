"""planktonio: get plankton images onto the GPU fast, and prove it.

    python -m planktonio synth    --out DIR           # the embedded default data set
    python -m planktonio prepare  --source DIR --out DIR
    python -m planktonio square   --source DIR --out DIR --size 255
    python -m planktonio doctor   [--json FILE]       # what this machine can run, and why not

The library: `make_loader` (loaders/), one `Transform` description for every
backend (transforms.py), dataset preparation (dataset.py).
"""

from .dataset import PreparedDataset, SplitPlan, prepare
from .errors import PlanktonioError
from .loaders import BACKENDS, Loader, make_loader
from .transforms import EVAL_TRANSFORM, TRAIN_AUGMENT, Output, Transform

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "EVAL_TRANSFORM", "Loader", "Output", "PlanktonioError", "PreparedDataset",
    "SplitPlan", "TRAIN_AUGMENT", "Transform", "make_loader", "prepare",
]

"""planktonio: get plankton images onto the GPU fast, and prove it.

    python -m planktonio synth    --out DIR           # the embedded default data set
    python -m planktonio prepare  --source DIR --out DIR
    python -m planktonio square   --source DIR --out DIR --size 255
    python -m planktonio doctor   [--json FILE]       # what this machine can run, and why not

The library: `make_loader` (loaders/), one `Transform` description for every
backend (transforms.py), preparing a data set (preparation.py) and reading it (dataset.py).
"""

import importlib

__version__ = "0.1.0"

# Where each public name lives. Imported on first use (PEP 562): `import planktonio.errors`
# or `planktonio.files` stays light (no torch), which lets `profiling report` render
# results without importing torch.
_EXPORTS = {
    "PreparedDataset": ".dataset", "SplitPlan": ".preparation", "prepare": ".preparation",
    "PlanktonioError": ".errors",
    "BACKENDS": ".loaders", "Loader": ".loaders", "make_loader": ".loaders",
    "DEFAULT_TRANSFORMS": ".transforms", "EVAL_TRANSFORM": ".transforms", "Output": ".transforms",
    "TRAIN_AUGMENT": ".transforms", "Transform": ".transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

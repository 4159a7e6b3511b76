"""`python -m train predict`: classify new images with a trained run, at the speed of its loader.

The package: options.py (what it is asked), settings.py (the run it uses, the provenance its files
carry), folder.py (whose OUT is: predictions.json and the writers' lock), program.py (which units this
task does), predictor.py (model and loader), writer.py (the writer
thread), formats.py (Parquet/CSV), merge.py (samples.csv, rejected.csv). Users: docs/predict.md.

    python -m train predict --run RUN --images SRC --out OUT [--checkpoint best|last] [--calibrated]
        [--backend B] [--batch-size N] [--device D] [--precision P] [--format parquet|csv] [--top-k 3]
        [--float16] [--embeddings] [--shard I/N] [--overwrite]

SRC is a folder of images (each folder holding images is a sample), a file
listing image paths, or tar shards (planktonio/unlabelled.py). The model is
the run's best.pt (or last.pt) with the run's *evaluation* transform, never
its training augmentation; the loader backend, batch size, device and
precision are the run's unless given.

What it writes, in OUT:
- units/<unit>.parquet (or .csv): per image its path, sample, the top-k
  classes with their probabilities (top1, top1_prob, top2, ...), `label` (the
  top-1 class, or "unclassified" below its class's threshold with
  --calibrated) and the whole probability vector (p_<class>; float16 with
  --float16); with --embeddings, <unit>.embeddings.npy: the head's input
  (float16), row for row. Every file carries its provenance: the run, the
  checkpoint's sha256, the classes, the transform, the temperature and
  thresholds, the backend, precision and device, the library versions, the
  command and the date (Parquet metadata; a CSV's first line, `# {...}`).
- units/<unit>.json, written last: the unit is done (its images, counts per
  sample, the images rejected and why). A rerun skips done units (for the
  same images and settings; --overwrite redoes them), so a stop loses at most
  the unit under way, and no image is ever written twice.
- once every unit of SRC is done (by this task or the others of a job array,
  --shard I/N): samples.csv (per sample, its images, predicted or rejected,
  each once; the count of each class, top-1 and with thresholds: the
  abundance table), rejected.csv and provenance.json.
- predictions.json: whose predictions OUT holds (checkpoint and settings);
  a task of other settings is refused before it writes (folder.py).

A file no loader can read (empty, text, 16-bit, not an image: found from its
header, before any decoding) or that breaks in decoding (truncated: the
torchvision and PIL loaders skip it, DALI stops on it and the batch is run
again without it), or that is listed twice, is listed in the unit's rejects
and rejected.csv with its reason; every other image is predicted exactly
once. Images a decoder fails on but PIL reads (a GPU decoder is pickier) are
decoded again with the reference backend, one at a time.

The loader runs ahead of the model as in training, and nothing waits for the
GPU per batch: results are copied to pinned host memory without blocking,
and a writer thread (a bounded queue) waits for them and writes the files.
"""

from .formats import provenance_of, read_predictions
from .merge import merge
from .options import FORMATS, UNITS, PredictOptions, parse_shard, predict_options
from .predictor import Predictor, Timing
from .program import predict
from .settings import owner_record, streaming_backends
from .writer import Writer

__all__ = ["FORMATS", "UNITS", "PredictOptions", "Predictor", "Timing", "Writer", "merge", "owner_record",
           "parse_shard", "predict", "predict_options", "provenance_of", "read_predictions", "streaming_backends"]

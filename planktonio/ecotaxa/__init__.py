"""EcoTaxa both ways: train from an export, send predictions back for validation (docs/ecotaxa.md).

- export.py: read an export (.zip or folder, one or several TSVs) into objects;
- select.py: which objects train (validated by default) and their class (category or hierarchy level);
- view.py: the export as class folders for `prepare`, its metadata beside the manifests, grouped splits;
- predictions.py: an export as predict's input; predict's output as import rows;
- importer.py: the import zip(s) (typed TSV, images, split by size);
- check.py: the import format's rules, checked.
"""

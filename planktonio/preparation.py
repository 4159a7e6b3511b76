"""Writing a prepared set: scan class folders, reject bad files, split, write manifests and the index.

A bad file must never reach a training run (planktonio/image_checks.py), so
`prepare` decodes every image once, up front and in parallel, writes each
rejected file with its reason to rejected.csv, and the manifests it writes
list only files that decoded. Reading the folder back is planktonio/dataset.py.

Layout written to OUT:
    train.txt, valid.txt, test.txt   one "relative/path label" per line, the
                                     format of DALI's readers.file(file_list=)
    classes.json                     class names (label = index), the source
                                     root the paths are relative to, counts
    index/train.npz, ...             per split, in manifest order, as numpy columns
                                     (planktonio/index.py): path, label, width, height
                                     (EXIF orientation applied), bytes, mtime, sha256;
                                     what every run reads (the text is for people)
    rejected.csv                     path,reason,detail for every bad file
    skipped.csv                      path,reason for every file that is not a
                                     candidate (other extensions, top-level files)
    duplicates.csv                   group,sha256,class,path,split for every file
                                     whose bytes another file also has

Every candidate is decoded by worker processes into columns, journaled so
that a stopped prepare goes on where it was (planktonio/inspection.py).

Byte-identical copies (found by the sha256 each decode check also takes):
copies within one class are kept, all in the split of their first copy, so
no picture is trained on and tested on at once; copies under two or more
classes are dropped (why: see `_judge`).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cores import available_cpus
from .dataset import SPLITS
from .errors import PlanktonioError
from .files import write_atomic
from .image_checks import IMAGE_EXTENSIONS
from .index import SplitIndex, index_file
from .inspection import Inspection, inspect_files
from .path_rules import path_problem, shown

FORMAT = 3  # of the prepared layout, recorded in classes.json
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What a source folder holds: each class's candidate images, and every file left out, with why."""

    classes: dict[str, list[str]]      # class name -> relative paths, sorted (sub-folders included)
    skipped: dict[str, str]            # relative path -> why it is not a candidate


def scan_classes(source: Path) -> Scan:
    """Each class folder under `source` (images in its sub-folders belong to it) and what is left out."""
    source = Path(source)
    if not source.is_dir():
        raise PlanktonioError(f"source {source}: no such directory")
    classes: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}

    def unreadable(error: OSError):
        raise PlanktonioError(f"{error.filename}: cannot be read ({error.strerror}); fix its permissions "
                              f"or move it out of {source}")

    try:
        top = sorted(source.iterdir())
    except OSError as error:
        unreadable(error)
    root = source.resolve()
    for entry in top:
        if not entry.is_dir():
            skipped[entry.name] = "not in a class folder"
            continue
        if entry.name.startswith("."):
            skipped[entry.name + "/"] = "hidden folder"
            continue
        if entry.is_symlink() and (entry.resolve() == root or entry.resolve() in root.parents):
            skipped[entry.name + "/"] = (f"a link to {entry.resolve()}, the source folder itself or a folder above "
                                         f"it: its images would be filed under a second class")
            continue
        files = []
        for folder, subfolders, names in os.walk(entry, onerror=unreadable):
            subfolders.sort()
            prefix = Path(folder).relative_to(source).as_posix() + "/"  # (once per folder, not per file)
            for name in sorted(names):
                rel = prefix + name
                if name.startswith("."):
                    skipped[rel] = "hidden file"
                elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    skipped[rel] = f"not an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                else:
                    files.append(rel)
        classes[entry.name] = sorted(files)
    if not classes:
        raise PlanktonioError(
            f"source {source}: no class folders (expected one sub-folder of images per class)")
    return Scan(classes, skipped)


@dataclass
class Candidates:
    """Every candidate image by position: class after class, each class's paths sorted (as scanned)."""

    found: dict[str, list[str]]   # class -> its sorted relative paths
    skipped: dict[str, str]       # relative path -> why it is not a candidate
    names: list[str]              # the classes, in order
    paths: list[str]              # by position
    class_of: np.ndarray          # int32 by position: the class's place in `names`
    class_start: dict[str, int]   # each class's first position

    @classmethod
    def scan(cls, source: Path, exclude: tuple[str, ...]) -> "Candidates":
        scan = scan_classes(source)
        found = {name: files for name, files in scan.classes.items() if name not in set(exclude)}
        if not found:
            raise PlanktonioError(f"source {source}: every class folder is excluded ({len(exclude)} names)")
        names = list(found)
        sizes = [len(found[n]) for n in names]
        return cls(found, scan.skipped, names, [f for n in names for f in found[n]],
                   np.repeat(np.arange(len(names), dtype=np.int32), sizes),
                   dict(zip(names, np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist())))

    def position(self, name: str, path: str) -> int:
        """A candidate's position: its class's first, plus its place in the class's sorted paths."""
        return self.class_start[name] + bisect.bisect_left(self.found[name], path)

    def unsafe_names(self) -> dict[int, tuple[str, str]]:
        """position -> ("unsafe name", why) for each path no manifest line can hold."""
        return {p: ("unsafe name", f"the name {problem} (rename the file)") for p, path in enumerate(self.paths)
                if (problem := path_problem(path))}


# --------------------------------------------------------------- splitting


@dataclass
class SplitPlan:
    """How many images of each class go to each split: fixed counts or fractions."""

    per_class: tuple[int, int, int] | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def counts(self, available: int) -> tuple[int, int, int]:
        if self.per_class is not None:
            return self.per_class
        n_valid = round(available * self.fractions[1])
        n_test = round(available * self.fractions[2])
        return available - n_valid - n_test, n_valid, n_test

    def describe(self) -> dict:
        if self.per_class is not None:
            return {"per_class": dict(zip(SPLITS, self.per_class))}
        return {"fractions": dict(zip(SPLITS, self.fractions))}


def split_class(images: list[str], counts: tuple[int, int, int], seed: int, class_name: str,
                copies: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Shuffle one class's distinct images reproducibly and cut them into train/valid/test.

    images: one path per distinct image (its first copy); copies: first copy
    -> its other copies in this class, which go wherever it goes. The counts
    (from --per-class, or --fractions of the distinct images) are therefore met
    exactly in distinct images, and a split's file count exceeds them by the
    extra copies it received. Without copies this is the plain seeded shuffle
    and cut it always was. The generator is seeded by (seed, class name), so
    one class's split does not change when other classes are added or dropped.
    """
    shuffled = sorted(images)
    random.Random(f"{seed}:{class_name}").shuffle(shuffled)
    n_train, n_valid, n_test = counts
    chosen = {"train": shuffled[:n_train], "valid": shuffled[n_train:n_train + n_valid],
              "test": shuffled[n_train + n_valid:n_train + n_valid + n_test]}
    copies = copies or {}
    return {split: sorted(path for first in firsts for path in (first, *copies.get(first, ())))
            for split, firsts in chosen.items()}


@dataclass(frozen=True)
class CopyGroup:
    """Usable files with identical bytes: (class, relative path) pairs sorted by path."""

    sha256: str
    files: tuple[tuple[str, str], ...]

    @property
    def classes(self) -> list[str]:
        return sorted({name for name, _ in self.files})


def find_copies(paths: list[str], class_of: np.ndarray, classes: list[str], sha256: np.ndarray,
                usable: np.ndarray) -> list[CopyGroup]:
    """Every group of two or more byte-identical usable files, in the order of their first paths (found by
    sorting the digests: no Python object per image)."""
    positions = np.flatnonzero(usable)
    if not len(positions):
        return []
    digests = np.ascontiguousarray(sha256[positions]).view(np.dtype((np.void, 32))).ravel()
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    groups: dict[int, list[int]] = {}
    for i in repeated.tolist():
        groups.setdefault(int(inverse[i]), []).append(int(positions[i]))
    found = [CopyGroup(bytes(sha256[members[0]]).hex(),
                       tuple(sorted(((classes[class_of[p]], paths[p]) for p in members), key=lambda f: f[1])))
             for members in groups.values()]
    return sorted(found, key=lambda group: group.files[0][1])


def _in_other_classes(group: CopyGroup, name: str, path: str) -> str:
    """rejected.csv's detail for one copy of an image filed under several classes."""
    others = [p for _, p in group.files if p != path]
    listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"also in {', '.join(c for c in group.classes if c != name)}: the same bytes as {listed} "
            f"(sha256 {group.sha256[:16]}...); put the image in its one right class folder")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# --------------------------------------------------------------- preparing

@dataclass
class PrepareResult:
    out: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    rejected: dict[str, tuple[str, str]]
    usable: dict[str, int]
    dropped_classes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copy_groups: list[CopyGroup] = field(default_factory=list)

    def summary(self) -> str:
        """A short table: one line per kept class, then totals."""
        width = max([len(c) for c in self.classes] + [5])
        lines = [f"{'class':<{width}}  {'usable':>6}  {'train':>6}  {'valid':>6}  {'test':>6}"]
        per_split = {s: {} for s in SPLITS}
        for split, entries in self.splits.items():
            for _, label in entries:
                per_split[split][label] = per_split[split].get(label, 0) + 1
        for label, name in enumerate(self.classes):
            row = [self.usable[name]] + [per_split[s].get(label, 0) for s in SPLITS]
            lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>6}" for v in row))
        totals = [sum(self.usable[c] for c in self.classes)] + [len(self.splits[s]) for s in SPLITS]
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{v:>6}" for v in totals))
        lines.append(
            f"{len(self.classes)} classes kept, {len(self.dropped_classes)} dropped (too few images), "
            f"{len(self.rejected)} files rejected (see {self.out / 'rejected.csv'}), "
            f"{len(self.skipped)} skipped as not images (see {self.out / 'skipped.csv'})")
        within = [g for g in self.copy_groups if len(g.classes) == 1]
        across = [g for g in self.copy_groups if len(g.classes) > 1]
        said = []
        if within:
            said.append(f"{_count(sum(len(g.files) - 1 for g in within), 'extra copy', 'extra copies')} of "
                        f"{_count(len(within), 'image')} kept in the split of their first copy")
        if across:
            said.append(f"{_count(sum(len(g.files) for g in across), 'file')} of {_count(len(across), 'image')} "
                        f"found in more than one class dropped (see rejected.csv)")
        if said:
            lines.append(f"byte-identical files (see {self.out / 'duplicates.csv'}): " + "; ".join(said))
        return "\n".join(lines)




def prepare(source: Path, out: Path, *, min_images: int = 1, plan: SplitPlan | None = None,
            seed: int = 0, workers: int | None = None, exclude: tuple[str, ...] = (),
            progress: bool | None = None, splitter=None) -> PrepareResult:
    """Scan, validate, filter and split `source`; write manifests and the binary index into `out`.

    exclude: class names to leave out, e.g. another prepared set's classes
    (pretraining on the classes a later fine-tuning does not use).
    progress: a progress bar of the decoding (default: when stderr is a terminal).
    splitter: how a class's distinct images are cut into splits (split_class's signature; default split_class),
    e.g. whole samples per split for an EcoTaxa export (planktonio/ecotaxa/view.py).
    The decoding is journaled in OUT (planktonio/inspection.py): the same call
    after a stop goes on where it was, to the same result.
    """
    source, out = Path(source).resolve(), Path(out)
    if out.exists() and not out.is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    plan = plan or SplitPlan()
    candidates = Candidates.scan(source, exclude)
    unsafe = candidates.unsafe_names()
    skip = np.zeros(len(candidates.paths), dtype=bool)
    skip[list(unsafe)] = True
    out.mkdir(parents=True, exist_ok=True)
    checks, journal = inspect_files(source, candidates.paths, skip, workers or available_cpus(), out, progress)
    verdicts = _judge(candidates, {**unsafe, **checks.problems}, checks)
    selection = _select_classes(source, candidates, verdicts, min_images, plan)
    splits, positions = _draw_splits(candidates, selection, plan, seed, splitter)
    _write_indexes(out, splits, positions, checks)
    result = PrepareResult(out, selection.kept, splits,
                           {candidates.paths[p]: problem for p, problem in verdicts.rejected.items()},
                           {name: selection.usable[name] for name in selection.kept}, selection.dropped,
                           candidates.skipped, verdicts.copy_groups)
    _write_reports(source, result)
    _write_meta(source, result, min_images=min_images, seed=seed, plan=plan, exclude=exclude)
    journal.remove()
    return result


@dataclass
class Verdicts:
    """Each candidate rejected (position -> reason, detail) or usable, and the groups of identical files."""

    rejected: dict[int, tuple[str, str]]
    usable: np.ndarray                    # bool by position
    copy_groups: list[CopyGroup]


def _judge(candidates: Candidates, rejected: dict[int, tuple[str, str]], checks: Inspection) -> Verdicts:
    """The decode checks' verdicts, plus the copies filed under two or more classes: dropped, every one.

    Not refused as a whole run: one misfiled picture among tens of thousands
    must not stop it (the NDSB subset in ../shared/data has one:
    chaetognath_other/271.jpg and chaetognath_non_sagitta/14864.jpg are the
    same bytes), and rejected.csv names every copy for whoever can fix the
    labels. Not one copy kept: the files cannot say which label is right, so
    a kept copy trains or tests on a label that may be wrong, and one copy in
    train with another in test would leak a test image into training.
    """
    usable = np.ones(len(candidates.paths), dtype=bool)
    usable[list(rejected)] = False
    copy_groups = find_copies(candidates.paths, candidates.class_of, candidates.names, checks.sha256, usable)
    for group in copy_groups:
        if len(group.classes) > 1:
            for name, path in group.files:
                position = candidates.position(name, path)
                rejected[position] = ("duplicate in another class", _in_other_classes(group, name, path))
                usable[position] = False
    return Verdicts(rejected, usable, copy_groups)


@dataclass
class Selection:
    """The classes kept, each one's distinct images (first copies) and the extra copies that follow them."""

    kept: list[str]
    dropped: dict[str, int]              # class -> its distinct images, too few
    usable: dict[str, int]               # class -> usable files, copies included
    distinct: dict[str, list[str]]
    copies: dict[str, list[str]]         # a first copy -> its other copies in the class


def _select_classes(source: Path, candidates: Candidates, verdicts: Verdicts, min_images: int,
                    plan: SplitPlan) -> Selection:
    """The classes with enough distinct usable images for `min_images` and the split; an error otherwise."""
    names, usable = candidates.names, verdicts.usable
    # Copies within a class: each image counts once, and its extra copies follow its first copy.
    copies = {group.files[0][1]: [path for _, path in group.files[1:]]
              for group in verdicts.copy_groups if len(group.classes) == 1}
    extra = {path for others in copies.values() for path in others}
    usable_count = dict(zip(names, np.bincount(candidates.class_of[usable], minlength=len(names)).tolist()))
    distinct = {name: [f for p, f in enumerate(files, start=candidates.class_start[name]) if usable[p]
                       and f not in extra] for name, files in candidates.found.items()}
    kept = [name for name, images in distinct.items() if len(images) >= min_images and len(images) > 0]
    dropped = {name: len(images) for name, images in distinct.items() if name not in kept}
    if not kept:
        largest = max(distinct.items(), key=lambda item: len(item[1]))
        raise PlanktonioError(
            f"source {source}: no class has at least {min_images} usable images "
            f"(largest: {shown(largest[0])} with {len(largest[1])}){_why_rejected(candidates, verdicts)}")
    for name in kept:
        wanted = plan.counts(len(distinct[name]))
        if sum(wanted) > len(distinct[name]):
            raise PlanktonioError(
                f"class {name!r} has {len(distinct[name])} usable images"
                f"{' (not counting copies)' if len(distinct[name]) < usable_count[name] else ''} but the split "
                f"asks for {sum(wanted)} ({'+'.join(map(str, wanted))}); lower --per-class or raise --min-images")
    return Selection(kept, dropped, usable_count, {name: distinct[name] for name in kept}, copies)


def _why_rejected(candidates: Candidates, verdicts: Verdicts) -> str:
    """"; N of M files rejected: how many for each reason, e.g. the first": for an error that no class is left."""
    if not verdicts.rejected:
        return ""
    reasons: dict[str, int] = {}
    for reason, _ in verdicts.rejected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    first = min(verdicts.rejected)
    return (f"; {len(verdicts.rejected)} of {len(candidates.paths)} files rejected: "
            f"{', '.join(f'{n} {reason}' for reason, n in sorted(reasons.items()))} (e.g. "
            f"{shown(candidates.paths[first])}: {verdicts.rejected[first][1]})")


def _draw_splits(candidates: Candidates, selection: Selection, plan: SplitPlan, seed: int,
                 splitter=None) -> tuple[dict[str, list[tuple[str, int]]], dict[str, np.ndarray]]:
    """Each split's (path, label) pairs, class after class, and the candidates' positions in the same order."""
    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    positions: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label, name in enumerate(selection.kept):
        images = selection.distinct[name]
        parts = (splitter or split_class)(images, plan.counts(len(images)), seed, name, selection.copies)
        for split in SPLITS:
            splits[split].extend((path, label) for path in parts[split])
            positions[split].extend(candidates.position(name, path) for path in parts[split])
    return splits, {split: np.asarray(at, dtype=np.int64) for split, at in positions.items()}


# ---------------------------------------------------------------- writing


def _write_indexes(out: Path, splits: dict[str, list[tuple[str, int]]], positions: dict[str, np.ndarray],
                   checks: Inspection) -> None:
    """Each split's binary index, then its text manifest (a manifest without its index is never read)."""
    for split in SPLITS:
        manifest = "".join(f"{p} {label}\n" for p, label in splits[split]).encode("utf-8")
        at = positions[split]
        index = SplitIndex.build([p for p, _ in splits[split]], [label for _, label in splits[split]], checks.width[at],
                                 checks.height[at], checks.bytes[at], checks.mtime_ns[at], checks.sha256[at],
                                 manifest)
        index.write(index_file(out, split))
        write_atomic(out / f"{split}.txt", manifest)


def _write_reports(source: Path, result: PrepareResult) -> None:
    """rejected.csv, skipped.csv and duplicates.csv: every file left out, and every copy, with why."""
    write_atomic(result.out / "rejected.csv", _rejected_csv(source, result.rejected))
    write_atomic(result.out / "skipped.csv", _skipped_csv(source, result.skipped))
    write_atomic(result.out / "duplicates.csv", _duplicates_csv(source, result.copy_groups, result.splits))


def _write_meta(source: Path, result: PrepareResult, *, min_images: int, seed: int, plan: SplitPlan,
                exclude: tuple[str, ...]) -> None:
    """classes.json: the classes (label = index), the root the paths are relative to, counts, the settings."""
    meta = {
        "format": FORMAT,
        "root": str(source),
        "classes": result.classes,
        "num_classes": len(result.classes),
        "split_sizes": {s: len(result.splits[s]) for s in SPLITS},
        "usable_per_class": result.usable,
        "dropped_classes": result.dropped_classes,
        "excluded_classes": sorted(exclude),
        "rejected": len(result.rejected),
        "skipped": len(result.skipped),
        "duplicate_groups": len(result.copy_groups),
        "duplicates_dropped": sum(len(g.files) for g in result.copy_groups if len(g.classes) > 1),
        "min_images": min_images,
        "seed": seed,
        **plan.describe(),
    }
    write_atomic(result.out / "classes.json", json.dumps(meta, indent=2) + "\n")


def _skipped_csv(source: Path, skipped: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for path, reason in sorted(skipped.items()):
        writer.writerow([shown(str(source / path)), reason])
    return buffer.getvalue()


def _duplicates_csv(source: Path, groups: list[CopyGroup], splits: dict[str, list[tuple[str, int]]]) -> str:
    """One row per file of each copy group; split is empty for a file in no manifest (dropped as a copy
    in another class, its class not kept, or not drawn when --per-class takes fewer images)."""
    where = {path: split for split, entries in splits.items() for path, _ in entries}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "sha256", "class", "path", "split"])
    for number, group in enumerate(groups, start=1):
        for name, path in group.files:
            writer.writerow([number, group.sha256, name, shown(str(source / path)), where.get(path, "")])
    return buffer.getvalue()


def _rejected_csv(source: Path, rejected: dict[str, tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    for path, (reason, detail) in sorted(rejected.items()):
        writer.writerow([shown(str(source / path)), reason, detail])
    return buffer.getvalue()



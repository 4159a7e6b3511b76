"""EcoTaxa both ways (issue 37): reading an export, choosing classes, grouped splits, writing and checking an import.

The synthetic export is written by tests/ecotaxa_export.py from the synthetic set.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from planktonio.ecotaxa.check import check_import, tsv_rows
from planktonio.ecotaxa.export import is_export, read_export
from planktonio.ecotaxa.importer import ImportRow, write_import
from planktonio.ecotaxa.select import Level, parse_statuses, select
from planktonio.ecotaxa.view import sample_splits
from planktonio.errors import PlanktonioError

from .ecotaxa_export import export_rows, write_export


@pytest.fixture(scope="module")
def rows():
    return export_rows(per_class=20)


@pytest.fixture(scope="module")
def export_zip(tmp_path_factory, rows):
    return write_export(tmp_path_factory.mktemp("export") / "export.zip", rows)


def _ids(rows, status=None):
    return {r.object_id for r in rows if status is None or r.status == status}


# ---------------------------------------------------------------- reading


def test_an_export_reads_one_object_per_id_with_its_first_rank_image(export_zip, rows):
    export = read_export(export_zip)
    assert is_export(export_zip)
    assert {o.object_id for o in export.objects} == _ids(rows)
    assert len(export.objects) == len(rows) - 1  # one object has two rows
    two = next(o for o in export.objects if o.images == 2)
    assert two.image == rows[0].image and two.rank == 0  # rank 0, not the _b image of rank 1
    assert two.metadata["sample_cruise"] == "cruise-1" and two.metadata["object_lat"].startswith("43.5")
    assert export.missing_images == []


def test_the_unpacked_folder_with_a_type_row_reads_the_same(tmp_path, rows, export_zip):
    folder = write_export(tmp_path / "export", rows, types=True, zipped=False)
    assert is_export(folder)
    from_folder = {o.object_id: (o.status, o.category, o.sample_id) for o in read_export(folder).objects}
    from_zip = {o.object_id: (o.status, o.category, o.sample_id) for o in read_export(export_zip).objects}
    assert from_folder == from_zip
    export = read_export(folder)
    assert Path(export.objects[0].image).is_file()
    assert export.objects[0].types["object_lat"] == "[f]"


def test_an_image_folder_is_not_an_export(tmp_path):
    (tmp_path / "copepod").mkdir()
    (tmp_path / "copepod" / "a.jpg").write_bytes(b"x")
    assert not is_export(tmp_path)


def test_a_tsv_without_the_annotation_columns_is_one_clear_error(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "ecotaxa_x.tsv").write_text("object_id\timg_file_name\nA\ta.jpg\n")
    with pytest.raises(PlanktonioError, match="no column object_annotation_status, object_annotation_category"):
        read_export(folder)


# ---------------------------------------------------------------- choosing


def test_validated_only_by_default_and_the_rest_counted(export_zip, rows):
    chosen = select(read_export(export_zip), Level.parse(None))
    assert {o.object_id for o, _ in chosen.kept} == _ids(rows, "validated")
    assert chosen.left_out == {"predicted (status not asked for)": len(_ids(rows, "predicted")),
                               "dubious (status not asked for)": len(_ids(rows, "dubious"))}
    assert set(chosen.categories) == {"Calanus", "Oithona", "Chaetognatha", "Acantharea"}


def test_a_named_level_maps_every_copepod_genus_to_copepoda(export_zip):
    chosen = select(read_export(export_zip), Level.parse("Copepoda"))
    assert set(chosen.categories) == {"Copepoda", "Chaetognatha", "Acantharea"}
    assert {c for o, c in chosen.kept if o.category in ("Calanus", "Oithona")} == {"Copepoda"}
    by_depth = select(read_export(export_zip), Level.parse("3"))  # living > Eukaryota > (Opisthokonta|Harosa)
    assert set(by_depth.categories) == {"Opisthokonta", "Harosa"}


def test_statuses_can_be_asked_for_but_not_invented(export_zip, rows):
    chosen = select(read_export(export_zip), Level(), parse_statuses("validated,dubious"))
    assert {o.object_id for o, _ in chosen.kept} == _ids(rows, "validated") | _ids(rows, "dubious")
    with pytest.raises(PlanktonioError, match="--ecotaxa-status"):
        parse_statuses("validated,sure")


def test_grouped_splits_put_every_sample_in_one_split():
    sizes = {f"s{i}": 10 + i for i in range(7)}
    placed = sample_splits(sizes, (0.6, 0.2, 0.2), seed=3)
    assert set(placed) == set(sizes)
    assert set(placed.values()) == {"train", "valid", "test"}
    train = sum(sizes[s] for s, split in placed.items() if split == "train")
    assert 0.45 < train / sum(sizes.values()) < 0.75
    assert sample_splits(sizes, (0.6, 0.2, 0.2), seed=3) == placed  # reproducible
    assert set(sample_splits({"a": 5, "b": 1, "c": 1}, (0.8, 0.1, 0.1), seed=0).values()) == {"train", "valid",
                                                                                             "test"}


# ---------------------------------------------------------------- writing and checking an import


def _import_rows(tmp_path, n=6, size=2000):
    rows = []
    for i in range(n):
        image = tmp_path / f"img{i}.jpg"
        image.write_bytes(bytes(size))
        rows.append(ImportRow(f"o{i}", image, "Copepoda" if i % 3 else "", [("Copepoda", 0.7), ("Chaetognatha", 0.2)],
                              sample_id=f"s{i % 2}", metadata={"object_lat": "43.1", "sample_cruise": "c1"}))
    return rows


def test_an_import_passes_the_format_checks_and_leaves_unclassified_objects_without_category(tmp_path):
    zips = write_import(_import_rows(tmp_path), tmp_path / "out", top_k=2)
    assert [z.name for z in zips] == ["ecotaxa_import_001.zip"]
    assert check_import(zips) == []
    written = {r["object_id"]: r for r in tsv_rows(zips)}
    assert written["o1"]["object_annotation_category"] == "Copepoda"
    assert written["o1"]["object_annotation_status"] == "predicted"
    assert written["o0"]["object_annotation_category"] == written["o0"]["object_annotation_status"] == ""
    assert written["o0"]["object_top1"] == "Copepoda" and float(written["o0"]["object_top2_score"]) == 0.2
    with zipfile.ZipFile(zips[0]) as archive:
        lines = archive.read("ecotaxa_import_001.tsv").decode().splitlines()
    header, types = lines[0].split("\t"), lines[1].split("\t")
    assert dict(zip(header, types))["object_top1_score"] == "[f]"
    assert dict(zip(header, types))["object_id"] == "[t]"
    assert "sample_id" in header and "sample_cruise" in header


def test_a_large_import_is_cut_into_zips_under_the_size_naming_each_object_once(tmp_path):
    zips = write_import(_import_rows(tmp_path, n=9, size=3000), tmp_path / "out", top_k=2, zip_bytes=8000)
    assert len(zips) >= 3
    assert all(z.stat().st_size <= 8000 for z in zips)
    assert check_import(zips) == []
    assert sorted(r["object_id"] for r in tsv_rows(zips)) == sorted(f"o{i}" for i in range(9))
    fewer = write_import(_import_rows(tmp_path, n=2), tmp_path / "out", top_k=2, zip_bytes=8000)
    assert sorted((tmp_path / "out").glob("*.zip")) == fewer  # the earlier parts are gone


def test_validated_objects_keep_their_annotation(tmp_path):
    rows = _import_rows(tmp_path, n=4)
    rows[2].annotate = False
    zips = write_import(rows, tmp_path / "out", top_k=2)
    assert check_import(zips) == []
    scores_only = [r for r in tsv_rows(zips) if r["_tsv"].endswith("_scores_only.tsv")]
    assert [r["object_id"] for r in scores_only] == ["o2"]
    assert "object_annotation_category" not in scores_only[0] and "object_annotation_status" not in scores_only[0]


def _zip_with(tmp_path, name, text, images=()):
    path = tmp_path / f"{len(list(tmp_path.glob('*.zip')))}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, text)
        for image in images:
            archive.writestr(image, b"x")
    return path


@pytest.mark.parametrize("name,text,images,problem", [
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\na.jpg\tA\n", ["a.jpg"], "type every column"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\n[t]\t[t]\na.jpg\tA\na.jpg\tA\n", ["a.jpg"], "twice"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\n[t]\t[t]\na.jpg\t\n", ["a.jpg"], "empty object_id"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\n[t]\t[t]\na.jpg\tA\n", [], "not in the zip"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\tsample_x\n[t]\t[t]\t[t]\na.jpg\tA\t1\n", ["a.jpg"],
     "sample_ columns need sample_id"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\tscore\n[t]\t[t]\t[f]\na.jpg\tA\t1\n", ["a.jpg"], "prefix"),
    ("ecotaxa_a.tsv", "img_file_name\tobject_id\tobject_s\n[t]\t[t]\t[f]\na.jpg\tA\thigh\n", ["a.jpg"],
     "typed [f]"),
    ("ecotaxa_a.tsv", ("img_file_name\tobject_id\tobject_annotation_status\tobject_annotation_category\n"
                       "[t]\t[t]\t[t]\t[t]\na.jpg\tA\tsure\tX\n"), ["a.jpg"], "not one of"),
    ("export.tsv", "img_file_name\tobject_id\n[t]\t[t]\na.jpg\tA\n", ["a.jpg"], "no ecotaxa"),
    ("ecotaxa_a.tsv", "object_id\n[t]\nA\n", [], "no img_file_name"),
])
def test_the_format_checks_catch_each_broken_rule(tmp_path, name, text, images, problem):
    problems = check_import([_zip_with(tmp_path, name, text, images)])
    assert any(problem in p for p in problems), problems


def test_an_object_in_two_zips_is_caught(tmp_path):
    text = "img_file_name\tobject_id\n[t]\t[t]\na.jpg\tA\n"
    zips = [_zip_with(tmp_path, "ecotaxa_a.tsv", text, ["a.jpg"]), _zip_with(tmp_path, "ecotaxa_b.tsv", text,
                                                                             ["a.jpg"])]
    assert any("also in" in p for p in check_import(zips))


# ---------------------------------------------------------------- the round trip (issue 37's "what must show")


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """One synthetic export prepared (copepod genera as Copepoda, whole samples per split), a tiny run fitted on
    it, and a second export of other samples (validated, dubious and predicted objects) predicted to EcoTaxa."""
    from planktonio.__main__ import main as planktonio_main
    from train.__main__ import main as train_main
    from train.loop import fit

    from .helpers import small_config
    root = tmp_path_factory.mktemp("round_trip")
    rows = export_rows(classes=("copepod", "chaetognath", "radiolarian"), per_class=24)
    source = write_export(root / "export.zip", rows)
    prepared = root / "prepared"
    assert planktonio_main(["prepare", "--source", str(source), "--out", str(prepared), "--ecotaxa-level",
                            "Copepoda", "--group-by", "sample_id", "--fractions", "0.6,0.2,0.2",
                            "--workers", "1"]) == 0
    run = root / "run"
    assert fit(small_config(training={"epochs": 1}), prepared, run) == 0
    new = export_rows(classes=("copepod", "chaetognath", "radiolarian"), per_class=6, samples=("new01", "new02"),
                      status=lambda i: ("validated", "dubious", "predicted")[i % 3], id_prefix="new")
    new_export = write_export(root / "new.zip", new)
    out = root / "predicted"
    assert train_main(["predict", "--run", str(run), "--images", str(new_export), "--out", str(out),
                       "--format", "ecotaxa", "--backend", "torchvision", "--workers", "0"]) == 0
    return rows, prepared, new, out


def test_prepare_keeps_exactly_the_validated_objects_and_no_sample_is_in_two_splits(round_trip):
    from planktonio import PreparedDataset
    from planktonio.ecotaxa.view import read_objects
    rows, prepared, _, _ = round_trip
    dataset = PreparedDataset.load(prepared)
    assert list(dataset.classes) == ["Acantharea", "Chaetognatha", "Copepoda"]
    objects = {row["path"]: row for row in read_objects(prepared)}
    in_splits = {split: [objects[path] for path, _ in dataset.entries(split)] for split in ("train", "valid",
                                                                                              "test")}
    kept = [o["object_id"] for split in in_splits.values() for o in split]
    assert sorted(kept) == sorted(_ids(rows, "validated"))  # each validated object once, nothing else
    samples = {split: {o["sample_id"] for o in objs} for split, objs in in_splits.items()}
    assert all(samples[a].isdisjoint(samples[b]) for a, b in (("train", "valid"), ("train", "test"),
                                                               ("valid", "test")))
    assert all(samples.values())
    copepods = {o["category"] for objs in in_splits.values() for o in objs if o["object_id"].startswith("obj_copepod")}
    assert copepods == {"Copepoda"}
    assert objects[next(iter(objects))]["sample_cruise"] == "cruise-1"  # metadata beside the manifests


def test_predict_writes_an_import_that_passes_the_checks_and_names_every_predicted_object_once(round_trip):
    _, _, new, out = round_trip
    zips = sorted(out.glob("ecotaxa_import_*.zip"))
    assert zips and check_import(zips) == []
    written = tsv_rows(zips)
    assert sorted(r["object_id"] for r in written) == sorted(_ids(new) - _ids(new, "validated"))
    assert {r["object_annotation_category"] for r in written} <= {"Acantharea", "Chaetognatha", "Copepoda"}
    assert {r["object_annotation_status"] for r in written} == {"predicted"}
    assert {r["sample_id"] for r in written} == {"new01", "new02"}
    assert {r["sample_cruise"] for r in written} == {"cruise-1"}


def test_predict_on_any_folder_writes_an_import_too(round_trip, tmp_path, capsys):
    from .helpers import run_train
    _, prepared, _, out = round_trip
    run = out.parent / "run"
    folder = tmp_path / "images"
    for path in sorted((prepared / "ecotaxa" / "images" / "Copepoda").rglob("*.jpg"))[:5]:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / path.parent.name / path.name).write_bytes(path.read_bytes())
    code, _, err = run_train(["predict", "--run", run, "--images", folder, "--out", tmp_path / "out", "--format",
                              "ecotaxa", "--backend", "torchvision", "--workers", "0", "--ecotaxa-zip-size",
                              "6KB"], capsys)
    assert code == 0, err
    zips = sorted((tmp_path / "out").glob("ecotaxa_import_*.zip"))
    assert len(zips) >= 2 and check_import(zips) == []
    assert len({r["object_id"] for r in tsv_rows(zips)}) == 5


def test_ecotaxa_options_without_an_export_or_with_counts_are_one_line_errors(tmp_path, export_zip, capsys):
    from .helpers import one_line_error, run_planktonio

    def error_of(*argv):
        code, _, err = run_planktonio(["prepare", "--out", tmp_path / "o", *argv], capsys)
        return one_line_error(code, err)
    (tmp_path / "src" / "a").mkdir(parents=True)
    assert "need an EcoTaxa export" in error_of("--source", tmp_path / "src", "--group-by", "sample_id")
    assert "--fractions, not --per-class" in error_of("--source", export_zip, "--group-by", "sample_id",
                                                      "--per-class", "2,1,1")
    assert "--ecotaxa-status" in error_of("--source", export_zip, "--ecotaxa-status", "sure")


def test_validated_objects_asked_for_are_scored_without_their_annotation(round_trip, tmp_path, capsys):
    from .helpers import one_line_error, run_train
    _, _, new, out = round_trip
    unpacked = write_export(tmp_path / "new", new, types=True, zipped=False)  # the export's folder form, this time
    args = ["predict", "--run", out.parent / "run", "--images", unpacked, "--out", tmp_path / "out",
            "--format", "ecotaxa", "--backend", "torchvision", "--workers", "0"]
    code, _, err = run_train([*args, "--ecotaxa-include-validated"], capsys)
    assert code == 0, err
    written = tsv_rows(sorted((tmp_path / "out").glob("ecotaxa_import_*.zip")))
    scores_only = {r["object_id"] for r in written if r["_tsv"].endswith("_scores_only.tsv")}
    assert scores_only == _ids(new, "validated")
    assert all("object_annotation_category" not in r for r in written if r["object_id"] in scores_only)
    mapping = tmp_path / "map.json"
    mapping.write_text('{"Copepod": "Copepoda"}')
    code, _, err = run_train([*args, "--ecotaxa-categories", mapping], capsys)
    assert "Copepod is not a class of the run" in one_line_error(code, err)


def test_calibrated_unclassified_objects_are_left_without_category(round_trip, tmp_path, capsys):
    import shutil

    from planktonio.ecotaxa.predictions import read_predictions

    from .helpers import run_train
    _, _, _, out = round_trip
    run = Path(shutil.copytree(out.parent / "run", tmp_path / "run"))
    code, _, err = run_train(["calibrate", "--run", run, "--target", "0.99", "--backend", "torchvision"], capsys)
    assert code == 0, err
    code, _, err = run_train(["predict", "--run", run, "--images", out.parent / "new.zip", "--out", tmp_path / "out",
                              "--format", "ecotaxa", "--calibrated", "--backend", "torchvision", "--workers", "0"],
                             capsys)
    assert code == 0, err
    zips = sorted((tmp_path / "out").glob("ecotaxa_import_*.zip"))
    assert check_import(zips) == []
    labels = read_predictions(tmp_path / "out")["label"].tolist()
    written = tsv_rows(zips)
    assert sum(r["object_annotation_category"] == "" for r in written) == labels.count("unclassified") > 0
    assert all((r["object_annotation_category"] == "") == (r["object_annotation_status"] == "") for r in written)


def test_an_unpacked_export_is_prepared_through_links_to_its_images(tmp_path, rows, capsys):
    from planktonio import PreparedDataset

    from .helpers import run_planktonio
    folder = write_export(tmp_path / "export", rows, types=True, zipped=False)
    code, out, err = run_planktonio(["prepare", "--source", folder, "--out", tmp_path / "prepared", "--workers", "1",
                                     "--ecotaxa-level", "Copepoda"], capsys)
    assert code == 0, err
    assert f"{len(_ids(rows, 'validated'))} objects kept in 3 classes" in out
    dataset = PreparedDataset.load(tmp_path / "prepared")
    path, _ = dataset.entries("train")[0]
    image = dataset.root / path
    assert image.is_symlink() and image.resolve().is_relative_to(folder.resolve())

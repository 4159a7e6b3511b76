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

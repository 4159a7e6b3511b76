"""The docs say what the programs do: README.md and docs/*.md checked against the code.

Every command shown in a code block is either run here on a tiny synthetic set
or its program's `--help` (run in-process) must list every option the page
shows for it; `make` targets and job scripts must exist; links between pages
and the repository paths they name must resolve; README.md stays short; and
no page carries a dated figure (measurements live in profiling/results/).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from .helpers import REPO, run_main, run_planktonio, run_train

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages outside docs/ that link into it: their links are checked too.
OTHER_PAGES = [REPO / "slurm" / "README.md", REPO / "profiling" / "results" / "README.md"]
# Paths a page names as an example of what a reader would write, not as a file of the checkout.
EXAMPLE_PATHS = {"planktonio/loaders/mine_loader.py"}
CHECKED_ROOTS = ("planktonio/", "train/", "profiling/", "slurm/", "tests/", "docs/", ".ci/")

PROGRAM = re.compile(r"(?:^|\s)(?:\S*/)?python3? -m (planktonio|train|profiling) (\S+)(.*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _code_lines(text: str):
    """The lines of fenced code blocks (not python ones) and of indented blocks, `$ ` prompts removed."""
    fence = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is not None:
            if fence != "python":
                yield stripped.removeprefix("$ ")
        elif line.startswith("    ") and stripped:
            yield stripped.removeprefix("$ ")


def commands(text: str) -> list[str]:
    """Each command of a page's code blocks, continuation lines joined, comments removed."""
    found, pending = [], ""
    for line in _code_lines(text):
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"\s#\s.*$", "", line).strip()
        if line:
            found.append(line)
    return found


def _all_commands() -> list[tuple[str, str]]:
    return [(_page_name(page), command) for page in PAGES for command in commands(page.read_text())]


def program_commands() -> list[tuple[str, str, str, list[str]]]:
    """(page, program, subcommand, options shown) for every `python -m planktonio|train|profiling ...`."""
    found = []
    for page, command in _all_commands():
        match = PROGRAM.search(command)
        if match:
            program, sub, rest = match.groups()
            found.append((page, program, sub, sorted(set(OPTION.findall(rest)))))
    return found


def _main(program: str):
    if program == "planktonio":
        from planktonio.__main__ import main
    elif program == "train":
        from train.__main__ import main
    else:
        from profiling.__main__ import main
    return main


def test_the_pages_show_commands_of_every_program():
    """The extraction finds what the pages show (else every test below would pass on nothing)."""
    shown = {(program, sub) for _, program, sub, _ in program_commands()}
    assert {("planktonio", "prepare"), ("planktonio", "pack"), ("train", "fit"), ("train", "predict"),
            ("profiling", "suite"), ("profiling", "inspect")} <= shown
    assert any(command.startswith("make demo") for _, command in _all_commands())


@pytest.mark.parametrize("program, sub", sorted({(p, s) for _, p, s, _ in program_commands()}))
def test_every_option_shown_is_in_the_programs_help(program, sub, capsys):
    code, out, err = run_main(_main(program), [sub, "--help"], capsys)
    assert code == 0, f"python -m {program} {sub} --help: {err}"
    missing = {}
    for page, p, s, options in program_commands():
        if (p, s) == (program, sub):
            for option in options:
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out):
                    missing.setdefault(page, []).append(option)
    assert not missing, f"options the docs show for `python -m {program} {sub}` that its --help lacks: {missing}"


def test_make_targets_and_job_scripts_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    for page, command in _all_commands():
        words = command.split()
        if words[0] == "make":
            assert words[1] in targets, f"{page}: `{command}`: no make target {words[1]}"
        if words[0] in ("sbatch", "slurm/submit", "slurm/sweep"):
            scripts = [w for w in words if w.startswith("slurm/")]
            assert scripts, f"{page}: `{command}` names no script"
            for script in scripts:
                assert (REPO / script).is_file(), f"{page}: `{command}`: {script} does not exist"


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES + OTHER_PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{_page_name(page)} -> {target}")
    assert not broken, broken


def test_repository_paths_named_exist():
    """A file the docs send a reader to (`train/loop.py`) is there: a renamed module shows up here."""
    missing = []
    for page in PAGES:
        for path in re.findall(r"`([\w./-]+\.(?:py|yaml|sbatch|sh|md|env|grid|toml))`", page.read_text()):
            if path.startswith(CHECKED_ROOTS) and path not in EXAMPLE_PATHS and not (REPO / path).exists():
                missing.append(f"{_page_name(page)}: {path}")
    assert not missing, missing


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines: move the detail to a page in docs/"


DATED = re.compile(r"\b20\d\d-\d\d-\d\d\b")
RATE = re.compile(r"(?<![\d,.])(?<!>= )\d(?:[\d,.]*\d)?\s*(?:[a-z]+ )?images/s\b")  # a goal (">= N") is no measurement


@pytest.mark.parametrize("page", PAGES, ids=_page_name)
def test_no_dated_figure(page):
    """Measurements and their dates live in profiling/results/*/README.md; a page links to them."""
    text = re.sub(r"profiling/results/[^\s)`]*", "", page.read_text())
    assert not DATED.findall(text), f"{_page_name(page)}: a date: move the figure to profiling/results/"
    assert not RATE.findall(text), f"{_page_name(page)}: {RATE.findall(text)}: a measurement belongs in profiling/results/"


# ------------------------------------------------------------------ the commands that are cheap, run


def test_data_commands_write_what_data_md_says(tmp_path, capsys):
    """docs/data.md: synth, prepare, square and pack, and the files its table names."""
    images, prepared = tmp_path / "images", tmp_path / "prepared"
    assert run_planktonio(["synth", "--out", images, "--classes", "2", "--per-class", "6", "--size", "48"],
                          capsys)[0] == 0
    assert run_planktonio(["prepare", "--source", images, "--out", prepared, "--per-class", "4,1,1",
                           "--seed", "0", "--workers", "1"], capsys)[0] == 0
    for name in ("train.txt", "valid.txt", "test.txt", "classes.json", "index/train.npz", "rejected.csv",
                 "skipped.csv", "duplicates.csv"):
        assert (prepared / name).is_file(), name
    assert run_planktonio(["square", "--source", images, "--out", tmp_path / "square", "--size", "32",
                           "--workers", "1"], capsys)[0] == 0
    assert run_planktonio(["pack", "--data", prepared, "--shard-size", "1MB"], capsys)[0] == 0
    assert (prepared / "shards" / "train.npz").is_file()
    assert (prepared / "shards" / "train.verified.json").is_file()


def test_a_run_folder_holds_what_training_md_says(run_copy, capsys):
    """docs/training.md's run-folder table, and `python -m train evaluate --run RUN --split test`."""
    for name in ("config.yaml", "run.json", "metrics.jsonl", "best.pt", "last.pt", "last.json", "summary.json"):
        assert (run_copy / name).is_file(), name
    code, _, err = run_train(["evaluate", "--run", run_copy, "--split", "test"], capsys)
    assert code == 0, err


def test_predict_writes_what_predict_md_says(finished_run, plankton, tmp_path, capsys):
    """docs/predict.md: a folder whose sub-folders are samples; units named <sample>.part0000."""
    new = tmp_path / "new"
    for sample, split_images in (("cast1", 0), ("cast2", 1)):
        (new / sample).mkdir(parents=True)
        for i, path in enumerate(sorted((plankton / "..").resolve().glob("images/*/*.jpg"))[split_images::7][:3]):
            (new / sample / f"{i}.jpg").write_bytes(path.read_bytes())
    out = tmp_path / "preds"
    code, _, err = run_train(["predict", "--run", finished_run, "--images", new, "--out", out, "--format", "csv",
                              "--workers", "1"], capsys)
    assert code == 0, err
    for sample in ("cast1", "cast2"):
        assert (out / "units" / f"{sample}.part0000.csv").is_file()
        assert (out / "units" / f"{sample}.part0000.json").is_file()
    for name in ("samples.csv", "rejected.csv", "provenance.json"):
        assert (out / name).is_file(), name


def test_module_docstrings_carry_no_dated_figure():
    """What a module is and why; its measurements live in profiling/results/, as the pages' do."""
    dated = []
    for path in sorted(p for root in ("planktonio", "train", "profiling") for p in (REPO / root).rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        doc = re.sub(r"profiling/results/\S*", "", doc)
        if DATED.search(doc) or RATE.search(doc):
            dated.append(path.relative_to(REPO).as_posix())
    assert not dated, f"dated figures in module docstrings: {dated}"


def test_config_keys_named_are_declared():
    """`training.checkpoint_every_s` and the like, as the pages name them, are keys train/config.py declares."""
    from train.config import RENAMED, SECTIONS, field_names
    renamed = {f"{section}.{key}" for section, key in RENAMED}
    unknown = []
    for page in PAGES:
        for section, key in re.findall(rf"(?<![\w/.-])({'|'.join(SECTIONS)})\.([a-z_]+)(?![\w/(-])", page.read_text()):
            if key not in ("md", "py") and key not in field_names(section) and f"{section}.{key}" not in renamed:
                unknown.append(f"{_page_name(page)}: {section}.{key}")
    assert not unknown, unknown


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_python_examples_use_what_planktonio_exports():
    """The pages' Python examples parse, import names planktonio has, and call make_loader with its keywords."""
    import inspect

    import planktonio
    accepted = set(inspect.signature(planktonio.make_loader).parameters)
    blocks = [(page, block) for page in PAGES for block in python_blocks(page.read_text())]
    assert blocks
    for page, block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module == "planktonio":
                for alias in node.names:
                    assert hasattr(planktonio, alias.name), f"{_page_name(page)}: planktonio has no {alias.name}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "make_loader":
                unknown = {k.arg for k in node.keywords} - accepted
                assert not unknown, f"{_page_name(page)}: make_loader has no {unknown}"


# What each job script runs with the arguments after its name (slurm/*.sbatch: "$@").
SCRIPT_PROGRAMS = {"slurm/train-1gpu.sbatch": ("train", "fit"), "slurm/train-node.sbatch": ("train", "fit"),
                   "slurm/train-nodes.sbatch": ("train", "fit"), "slurm/predict.sbatch": ("train", "predict"),
                   "slurm/trace.sbatch": ("profiling", "trace")}


def test_job_script_arguments_are_their_programs_options(capsys):
    """`slurm/submit slurm/trace.sbatch --active 10`: what follows the script is its program's option."""
    checked = 0
    for page, command in _all_commands():
        words = command.split()
        scripts = [i for i, w in enumerate(words) if w in SCRIPT_PROGRAMS]
        if words[0] not in ("sbatch", "slurm/submit") or not scripts:
            continue
        program, sub = SCRIPT_PROGRAMS[words[scripts[0]]]
        code, out, err = run_main(_main(program), [sub, "--help"], capsys)
        assert code == 0, err
        for option in OPTION.findall(" ".join(words[scripts[0] + 1:])):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), \
                f"{page}: `{command}`: python -m {program} {sub} has no {option}"
            checked += 1
    assert checked

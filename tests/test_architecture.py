"""The shape of the code: layers import downwards only, backends are plugins (no backend's name outside
its own module, no backend imports another), command-line defaults are the settings' defaults, and the
fit loop's free functions leave the Trainer's state to the Trainer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from planktonio.loaders import ALIASES, BACKENDS

from .helpers import REPO


def test_command_line_defaults_are_the_settings_defaults():
    from profiling.__main__ import build_parser
    from profiling.settings import AmpBenchmark, LoaderBenchmark, Smoke, Suite
    parser = build_parser()
    for command, cls, required in (("loaders", LoaderBenchmark, ["--data", "D"]), ("amp", AmpBenchmark, []),
                                   ("smoke", Smoke, ["--data", "D"]),
                                   ("suite", Suite, ["--data", "D", "--out", "O"])):
        args = vars(parser.parse_args([command, *required]))
        defaults = cls(**{k: args[k] for k in cls.__dataclass_fields__})
        assert defaults == cls(**{k: args[k] for k in cls.__dataclass_fields__ if k in ("data", "out")}), command
    args = parser.parse_args(["loaders", "--data", "D", "--backends", "dali-cpu,cache", "--no-eval-transform"])
    assert args.backends == ("dali-cpu", "cache") and args.eval_transform is False
    from planktonio.cli import settings_from
    from train.__main__ import CalibrateOptions, EvaluateOptions, build_parser as train_parser
    for command, cls in (("evaluate", EvaluateOptions), ("calibrate", CalibrateOptions)):
        assert settings_from(cls, train_parser().parse_args([command, "--run", "R"])) == cls(run=Path("R")), command


def test_help_lists_every_exit_code_and_where_the_options_live(capsys):
    """Issue 33: `python -m train --help` left out exit code 74 (a file could not be written), and
    `python -m profiling --help` sent readers to profiling/cli.py for options declared in settings.py."""
    import pytest

    from planktonio.errors import EXIT_DISK, EXIT_USAGE
    from profiling.__main__ import main as profiling_main
    from train.__main__ import main as train_main
    from train.signals import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_PEER_LOST
    for main in (train_main, profiling_main):
        with pytest.raises(SystemExit):
            main(["--help"])
    train_help, profiling_help = capsys.readouterr().out.split("usage: python -m profiling")
    listed = {int(code) for code in re.findall(r"^ +(\d+)  ", train_help.split("\nexit codes:\n")[1], re.M)}
    assert listed == {0, EXIT_USAGE, EXIT_NON_FINITE, EXIT_DISK, EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_ABORTED}
    assert "profiling/settings.py" in profiling_help and "profiling/cli.py" not in profiling_help


def python_files(*folders):
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def backend_module_of(name: str) -> Path:
    module = next(m for m in __import__("planktonio.loaders", fromlist=["BACKEND_MODULES"]).BACKEND_MODULES
                  if any(b.name == name for b in m.BACKENDS) or name in getattr(m, "ALIASES", {}))
    return Path(module.__file__)


LIBRARIES = {"torchvision", "dali"}


LIBRARY_FILES = {"planktonio/doctor.py", "planktonio/stack_probes.py", "profiling/environment.py", "profiling/render/common.py",
                 "profiling/accuracy.py", "train/predict/settings.py"}  # (predict: the library versions in its provenance)


# Words that are a backend's name but mean something else where they stand.
OTHER_MEANINGS = {("planktonio/memory.py", "memory"): "cgroup v1's memory controller"}


def test_no_backend_name_is_a_literal_outside_its_own_module():
    """A new backend must not need edits elsewhere: the rest of the code reads the registry, never names."""
    names = set(BACKENDS) | set(ALIASES)
    found = []
    for path in python_files("planktonio", "train", "profiling"):
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (relative, node.value) not in OTHER_MEANINGS:
                library = node.value in LIBRARIES and relative in LIBRARY_FILES
                if path != backend_module_of(node.value) and not library:
                    found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_backends_import_shared_pieces_never_each_other():
    from planktonio.loaders import BACKEND_MODULES
    backend_modules = {Path(m.__file__).stem for m in BACKEND_MODULES}
    for module in BACKEND_MODULES:
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {node.module.split(".")[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert not (imported & (backend_modules - {Path(module.__file__).stem})), module.__name__


def test_layers_import_downwards_only():
    """profiling -> train -> planktonio: planktonio imports neither, train does not import profiling."""
    for folder, forbidden in (("planktonio", ("train", "profiling")), ("train", ("profiling",))):
        for path in python_files(folder):
            text = path.read_text()
            for name in forbidden:
                assert not re.search(rf"^\s*(from|import) {name}\b", text, re.M), f"{path} imports {name}"


def test_no_free_function_of_the_fit_loop_changes_the_trainer():
    """train/loop.py: the Trainer owns its epochs; a free function neither assigns a Trainer's attribute nor
    calls a private method of one."""
    tree = ast.parse((REPO / "train" / "loop.py").read_text())
    found = []
    for function in (node for node in tree.body if isinstance(node, ast.FunctionDef)):
        for node in ast.walk(function):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [f"{function.name}: assigns {ast.unparse(t)}" for t in targets
                          if isinstance(t, ast.Attribute)]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{function.name}: uses {ast.unparse(node)}")
    assert not found, found


MODULE_LINES, FUNCTION_LINES = 500, 60


def test_modules_and_functions_are_short():
    """Issue 33: no module over 500 lines in planktonio/ and train/, no function over 60 lines outside tests."""
    too_long = [f"{path.relative_to(REPO).as_posix()}: {lines} lines" for path in python_files("planktonio", "train")
                if (lines := len(path.read_text().splitlines())) > MODULE_LINES]
    for path in python_files("planktonio", "train", "profiling"):
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES:
                    too_long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long

"""Writing files (planktonio/files.py): whole or not at all, a temporary per writer so that two processes
never collide, and a disk that cannot take a file said in one line (exit 74), before expensive work where
the place is known beforehand, and with nothing already written lost."""

from __future__ import annotations

import errno
import multiprocessing
import os

import pytest
import torch

from planktonio import files
from planktonio.errors import EXIT_DISK, DiskError
from train import checkpoint_file
from train.executor import Executor

from .helpers import run_profiling, run_train, same_weights, weights


def _save_many(path: str, writer: int, times: int, failures) -> None:
    for i in range(times):
        try:
            files.write_atomic(path, f"writer {writer}, write {i}\n" * 2000)
        except Exception as error:  # counted, and shown by the assertion
            failures.append(f"{type(error).__name__}: {error}")


def test_two_processes_writing_one_file_never_collide(tmp_path):
    """Finding 4: every writer of a file used one temporary name (.NAME.tmp), so two fits sharing a cache
    folder raced: 18 of 40 saves failed in each of two processes. Now each writer has its own temporary: all
    saves succeed, the file is always one writer's whole text, and no temporary is left."""
    path = tmp_path / "shared.txt"
    with multiprocessing.Manager() as manager:
        failures = manager.list()
        writers = [multiprocessing.Process(target=_save_many, args=(str(path), n, 40, failures)) for n in (0, 1)]
        for process in writers:
            process.start()
        for process in writers:
            process.join(timeout=120)
        assert list(failures) == [] and all(p.exitcode == 0 for p in writers)
    lines = set(path.read_text().splitlines())
    assert len(lines) == 1 and lines.pop().startswith("writer ")
    assert files.temporaries(path) == []


def test_a_write_that_fails_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    files.write_atomic(path, "old\n")
    fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(DiskError, match=f"{path}: cannot be written \\(No space left on device\\)"):
        files.write_atomic(path, "new\n", durable=True)
    monkeypatch.setattr(files.os, "fsync", fsync)
    assert path.read_text() == "old\n" and files.temporaries(path) == []
    with pytest.raises(DiskError, match="is a folder"):
        files.check_writable(tmp_path, "--json")
    with pytest.raises(DiskError, match="does not exist"):
        files.check_writable(tmp_path / "no" / "such.json", "--json")


def no_space(f):
    f.write(b"the first bytes of last.pt")
    raise OSError(errno.ENOSPC, "No space left on device")


def no_space_under_torch(f):
    """What torch.save raises when a write of its stream fails: its own RuntimeError, the OSError kept as its
    context (measured with torch 2.10: test_torch_save_on_a_disk_that_fills_is_a_disk_error)."""
    error = RuntimeError("[enforce fail at inline_container.cc:668] . unexpected pos 704 vs 598")
    try:
        no_space(f)
    except OSError as lost:
        error.__context__ = lost
    raise error


@pytest.mark.parametrize("fail", [no_space, no_space_under_torch])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_exit_74_and_the_run_resumes(run_copy, plankton, capsys,
                                                                                  monkeypatch, finished_run, fail):
    """Finding 5: `--out` on a full disk was a traceback; issue 34 #9: so was torch.save's RuntimeError over
    the OSError. Now: one line naming last.pt, exit 74, and the checkpoints already there are intact (the run
    resumes from them)."""
    save = torch.save

    def full_disk(state, f, *args, **kwargs):
        if "batches_done" in state:  # last.pt's content: the disk is full by then
            fail(f)
        return save(state, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint_file.torch, "save", full_disk)
    code, _, err = run_train(["fit", "--out", run_copy, "--data", plankton, "--resume", "--set",
                              "training.epochs=3"], capsys)
    assert code == EXIT_DISK, err
    line = err.strip()
    assert "\n" not in line and f"{run_copy / 'last.pt'}: cannot be written (No space left on device)" in line
    assert same_weights(weights(run_copy), weights(finished_run))  # last.pt as it was
    monkeypatch.setattr(checkpoint_file.torch, "save", save)
    assert run_train(["fit", "--out", run_copy, "--data", plankton, "--resume", "--set", "training.epochs=3"],
                     capsys)[0] == 0
    assert checkpoint_file.load(run_copy / "last.pt")["epoch"] == 3


def test_torch_save_on_a_disk_that_fills_is_a_disk_error(tmp_path):
    """Issue 34 #9, with a real write failing in the kernel: a file size limit (RLIMIT_FSIZE, EFBIG: what a
    quota or a full disk does to a write) under a real torch.save. torch raises its own RuntimeError; the
    checkpoint writer says the disk's reason in one line, and the previous checkpoint is intact."""
    import resource
    import signal
    path = tmp_path / "last.pt"
    checkpoint_file.save_atomic({"epoch": 1, "w": torch.zeros(4)}, path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, limits[1]))
    try:
        with pytest.raises(DiskError, match=f"{path}: cannot be written \\(File too large\\)"):
            checkpoint_file.save_atomic({"epoch": 2, "w": torch.zeros(2**18)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert checkpoint_file.load(path)["epoch"] == 1 and files.temporaries(path) == []


def test_evaluate_on_a_run_folder_it_cannot_write_says_so_before_computing(run_copy, capsys, monkeypatch):
    """Finding 5: evaluate on a read-only run folder computed the scores, then failed taking the lock."""
    from train import run_folder
    open_file = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open_file(path, flags, *args)
    monkeypatch.setattr(run_folder.os, "open", read_only)
    evaluated = []
    monkeypatch.setattr(Executor, "evaluate", lambda *a, **k: evaluated.append(1))
    code, _, err = run_train(["evaluate", "--run", run_copy], capsys)
    assert code == EXIT_DISK and evaluated == []
    assert err.count("\n") == 1 and f"{run_copy}: cannot be written (Read-only file system)" in err


def test_inspect_into_a_folder_says_so_before_the_analysis(tmp_path, capsys, monkeypatch):
    """Finding 5: `profiling inspect --json DIR` failed after the analysis. Now before it."""
    from profiling import inspect_trace
    monkeypatch.setattr(inspect_trace, "load_events", lambda *a, **k: pytest.fail("the analysis ran"))
    (tmp_path / "trace.json").write_text("{}")
    code, _, err = run_profiling(["inspect", tmp_path / "trace.json", "--json", tmp_path], capsys)
    assert code == EXIT_DISK and f"--json {tmp_path}: is a folder" in err and len(err.strip().splitlines()) == 1

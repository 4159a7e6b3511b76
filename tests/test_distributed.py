"""Several processes (train/distributed.py): each rank's GPU bound before the process group, a lost peer
said in one line, the group torn down in the order that cannot hang, and real 2-rank gloo runs under
torchrun (shards, metrics summed over ranks, a stop on one rank resumed bitwise, each rank's own dropout).

What only several GPUs or NCCL would show is tested with recording fakes of torch.cuda and
torch.distributed (`FakeDist`): one process that plays rank 0 (or any rank) of a job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from train import distributed, executor as executor_module
from train.loop import fit
from train.signals import EXIT_INTERRUPTED, EXIT_OK, EXIT_PEER_LOST

from .helpers import (
    REPO,
    count_training_steps,
    process_env,
    read_checkpoint,
    read_metrics,
    run_train,
    same_run,
    small_config,
    torchrun,
    write_config,
)

# ------------------------------------------------------------------ which GPU a rank takes


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 4, 0), (3, 4, 3), (3, 1, 0), (5, 4, 1), (2, 0, 0)])
def test_a_rank_takes_its_local_rank_modulo_the_gpus_it_sees(local_rank, visible, expected):
    """All four of a node's GPUs visible to every task: local ranks 0-3 take cuda:0-3. One GPU bound per task
    (each task sees only its own, as cuda:0): every rank takes cuda:0, not "invalid device ordinal"."""
    assert distributed.device_index(local_rank, visible) == expected


def test_the_rank_device_under_both_bindings(monkeypatch):
    ctx = distributed.Context(rank=3, world_size=4, local_rank=3)
    assert distributed.rank_device(torch.device("cuda"), ctx, visible=4) == torch.device("cuda", 3)
    assert distributed.rank_device(torch.device("cuda"), ctx, visible=1) == torch.device("cuda", 0)
    assert distributed.rank_device(torch.device("cpu"), ctx, visible=0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    alone = distributed.Context()
    assert distributed.rank_device(torch.device("cuda", 1), alone, visible=2) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cuda"), alone, visible=2) == torch.device("cuda", 0)


@pytest.mark.parametrize("rank", [0, 1])
def test_the_first_rank_alone_stats_the_files_and_every_rank_gets_its_verdict(plankton, tmp_path, monkeypatch,
                                                                             rank):
    """One stat per loose file per run, not per rank: rank 0 checks the files (and finds the one changed),
    rank 1 stats none and stops with rank 0's verdict, in the same words."""
    import shutil

    from planktonio import dataset as dataset_module
    from planktonio.dataset import PreparedDataset
    from planktonio.errors import PlanktonioError
    from train.executor import Executor
    from train.inputs import checked_specs
    data = tmp_path / "prepared"
    shutil.copytree(plankton, data)
    shutil.copytree(plankton.parent / "images", tmp_path / "images")
    meta = json.loads((data / "classes.json").read_text())
    (data / "classes.json").write_text(json.dumps({**meta, "root": str(tmp_path / "images")}))
    victim = PreparedDataset.load(data).entries("valid")[2][0]
    with open(tmp_path / "images" / victim, "ab") as f:
        f.write(b"\0")
    stats = []
    real_stat_files = dataset_module.stat_files
    monkeypatch.setattr(dataset_module, "stat_files", lambda *a: stats.append(1) or real_stat_files(*a))
    said = {}

    def first_rank_says(message, what=""):  # what the wait gives: rank 0's message, on rank 1 too
        said["rank0"] = said.get("rank0", message)
        return said["rank0"] if rank == 0 else f"{tmp_path / 'images' / victim}: changed since prepare checked it"
    monkeypatch.setattr(distributed, "first_rank_says", first_rank_says)
    ctx = distributed.Context(rank=rank, world_size=2, local_rank=rank)
    executor = Executor(small_config(), data, ctx)
    with pytest.raises(PlanktonioError, match=f"{victim}: changed since prepare checked it"):
        checked_specs(executor)
    assert (len(stats) > 0) == (rank == 0)


class DictStore:
    """The rendezvous store's key-value calls, in a dict."""

    def __init__(self):
        self.values = {}

    def set(self, key, value):
        self.values[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(key in self.values for key in keys)

    def get(self, key):
        return self.values[key]

    def add(self, key, amount):
        self.values[key] = int(self.values.get(key, 0)) + amount
        return self.values[key]


class FakeDist:
    """torch.distributed for one process playing one rank of `world`: every call is recorded in `calls`
    (with the current CUDA device where a collective would use it) and changes nothing: an all-reduce adds
    no other rank's share, a gather repeats this rank's object."""

    DistBackendError = type("DistBackendError", (RuntimeError,), {})

    def __init__(self, world: int = 2, rank: int = 0, current_device=lambda: None):
        self.world, self.rank, self.current_device = world, rank, current_device
        self.initialized, self.calls = False, []
        self.store = DictStore()
        self.distributed_c10d = type("c10d", (), {"_get_default_store": staticmethod(lambda: self.store)})

    def is_initialized(self) -> bool:
        return self.initialized

    def init_process_group(self, backend, **kwargs):
        self.calls.append(("init_process_group", backend, kwargs.get("device_id"), self.current_device()))
        self.initialized = True

    def destroy_process_group(self):
        self.calls.append(("destroy_process_group",))
        self.initialized = False

    def all_gather_object(self, out, obj):
        self.calls.append(("all_gather_object", self.current_device()))
        out[:] = [obj] * len(out)

    def gather_object(self, obj, gathered, dst=0):
        self.calls.append(("gather_object", self.current_device()))
        if gathered is not None:
            gathered[:] = [obj] * len(gathered)

    def all_reduce(self, tensor, op=None):
        self.calls.append(("all_reduce", str(tensor.device)))

    def all_gather(self, out, tensor):
        self.calls.append(("all_gather", str(tensor.device)))
        for o in out:
            o.copy_(tensor)

    def broadcast(self, tensor, src=0):
        self.calls.append(("broadcast", str(tensor.device)))

    def broadcast_object_list(self, objects, src=0):
        self.calls.append(("broadcast_object_list", self.current_device()))

    def barrier(self):
        self.calls.append(("barrier", self.current_device()))

    def get_world_size(self):
        return self.world

    def get_rank(self):
        return self.rank

    def get_backend(self):
        return "gloo"


class FakeCuda:
    """torch.cuda with `visible` GPUs: set_device is recorded, current_device follows it."""

    def __init__(self, visible: int):
        self.visible, self.current, self.calls = visible, 0, []

    def device_count(self):
        return self.visible

    def set_device(self, device):
        self.calls.append(("set_device", device.index))
        self.current = device.index

    def current_device(self):
        return self.current


@pytest.mark.parametrize("visible", [4, 1])
@pytest.mark.parametrize("local_rank", [0, 1, 2, 3])
def test_each_rank_binds_its_gpu_before_the_process_group_and_every_collective_runs_there(monkeypatch, visible,
                                                                                          local_rank):
    """Four ranks on a node that shows each task all 4 GPUs (torchrun, srun with --gres=gpu:4) or only its
    own (one GPU bound per task): the rank's GPU is the current device before init_process_group, is given
    to it as device_id, and is current when the first collective (an object gather) runs."""
    cuda = FakeCuda(visible)
    fake = FakeDist(world=4, rank=local_rank, current_device=cuda.current_device)
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed.torch, "cuda", cuda)
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    ctx = distributed.join(torch.device("cuda"), 60)
    mine = local_rank % visible
    assert ctx.device == torch.device("cuda", mine) and ctx.rank == local_rank
    assert cuda.calls == [("set_device", mine)]
    assert fake.calls[0] == ("init_process_group", "nccl", torch.device("cuda", mine), mine)
    assert fake.calls[1] == ("all_gather_object", mine)


# ------------------------------------------------------------------ a peer that left


def test_a_lost_peer_is_one_line_naming_it(monkeypatch):
    ctx = distributed.Context(rank=0, world_size=2, local_rank=0,
                              peers=((0, "node1", 11), (1, "node2", 22)))
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "node1")
    monkeypatch.setattr(distributed.socket, "gethostbyaddr", lambda address: ("node2", [], [address]))
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                         "[10.0.0.2]:41234")
    line = str(distributed.peer_lost(ctx, error, "validation (all_reduce)", "at epoch 3, step 5"))
    assert line == ("rank 0 on node1: rank 1 on node2 left during validation (all_reduce) at epoch 3, step 5 "
                    "(Connection closed by peer [10.0.0.2]:41234)")
    hung = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation")
    assert "stopped answering during" in str(distributed.peer_lost(ctx, hung, "x", "at epoch 0, step 1"))


# ------------------------------------------------------------------ the order things are released in


@pytest.fixture
def two_ranks_played_by_one(monkeypatch):
    """This process as rank 0 of 2 over FakeDist, with a DDP stand-in whose release is recorded in the same
    list as the process group's destruction."""
    fake = FakeDist(world=2)
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")

    class RecordedDDP(nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module
            weakref.finalize(self, fake.calls.append, ("ddp released",))

        def forward(self, x):
            return self.module(x)
    monkeypatch.setattr(executor_module, "DistributedDataParallel", RecordedDDP)
    return fake


def releases(calls) -> list[str]:
    return [call[0] for call in calls if call[0] in ("ddp released", "destroy_process_group")]


@pytest.mark.parametrize("ending", ["finished", "signal", "error", "peer lost"])
def test_the_ddp_model_is_released_before_the_process_group_on_every_way_out(two_ranks_played_by_one, plankton,
                                                                             tmp_path, monkeypatch, ending):
    """torch's process-group destructor can wait for gloo's threads holding the GIL (pytorch#56297): a
    finished 2-rank run hung at exit when DDP's Reducer was the last to hold the group. Whatever the way out
    of fit, the DDP model goes first, then the group; after a lost peer the group is left alone."""
    fake = two_ranks_played_by_one

    def fault(step):
        if step != 3:
            return
        if ending == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        elif ending == "error":
            raise ValueError("a bug in a step")
        elif ending == "peer lost":
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234")
    count_training_steps(monkeypatch, fault)
    config = small_config(training={"epochs": 1, "check_every": 2})
    if ending == "error":
        with pytest.raises(ValueError, match="a bug in a step"):
            fit(config, plankton, tmp_path / "run")
    else:
        expected = {"finished": EXIT_OK, "signal": EXIT_INTERRUPTED, "peer lost": EXIT_PEER_LOST}[ending]
        assert fit(config, plankton, tmp_path / "run") == expected
    if ending == "peer lost":
        assert releases(fake.calls) == ["ddp released"]
    else:
        assert releases(fake.calls) == ["ddp released", "destroy_process_group"]


def test_evaluate_destroys_the_process_group_last(two_ranks_played_by_one, run_copy, capsys):
    fake = two_ranks_played_by_one
    code, _, err = run_train(["evaluate", "--run", run_copy, "--split", "valid"], capsys)
    assert code == 0, err
    assert [call[0] for call in fake.calls][-1] == "destroy_process_group"


# ------------------------------------------------------------------ real ranks: torchrun, gloo


def test_two_process_gloo_run_with_dali_shards(plankton, tmp_path, capsys):
    config = write_config(tmp_path / "ddp.yaml", loader={"backend": "dali-cpu", "workers": 1},
                          training={"epochs": 2})
    run = tmp_path / "run"
    result = torchrun("-m", "train", "fit", "--config", config, "--data", plankton, "--out", run)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout
    metrics = read_metrics(run)
    # 160 training images: each rank takes 80, 5 steps of 16; 40 validation images, each seen once.
    assert all(m["train_images"] == 160 and m["val_images"] == 40 for m in metrics)
    # The same accuracy logic as one process: evaluate the final weights alone, on the validation split.
    code, _, err = run_train(["evaluate", "--run", run, "--split", "valid", "--checkpoint", "last"], capsys)
    assert code == 0, err
    evaluation = json.loads((run / "eval-valid.json").read_text())
    assert evaluation["images"] == 40
    assert evaluation["acc"] == pytest.approx(metrics[-1]["val_acc"], abs=1e-9)
    assert evaluation["loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-3)


def test_two_process_run_stopped_by_sigterm_resumes_bitwise_and_ranks_draw_their_own_dropout(plankton, tmp_path):
    """mobilenet_v3_small (dropout before its last layer), 2 gloo ranks of 5 steps an epoch, a check
    every 2 steps at most (the first after step 1, then every 2 while steps are fast). Rank 1 alone gets
    SIGTERM after its 3rd step; both stop at the check right after it, where they agree. The
    resumed run ends bitwise where the uninterrupted one does, which needs each rank's own random
    state back (restoring rank 0's on both ranks was tried: the weights differ)."""
    config = write_config(tmp_path / "ddp.yaml", model={"name": "mobilenet_v3_small"},
                          optimizer={"name": "sgd", "lr": 0.01}, training={"epochs": 2, "check_every": 2})
    hooked = ["-m", "tests.fit_with_hooks", "fit", "--config", config, "--data", plankton]
    whole = torchrun(*hooked, "--out", tmp_path / "whole", env={"MASKS": str(tmp_path / "masks")})
    assert whole.returncode == 0, whole.stdout + whole.stderr
    masks = [json.loads((tmp_path / "masks" / f"mask-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert masks[0] != masks[1] and all(100 < sum(mask) < 412 for mask in masks)  # 512 draws, p = 0.5

    split = torchrun(*hooked, "--out", tmp_path / "split", env={"SIGTERM_RANK": "1", "SIGTERM_AT_STEP": "3"})
    assert split.returncode != 0 and "stopping on a signal at epoch 0, step 3" in split.stdout, split.stderr
    state = read_checkpoint(tmp_path / "split" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (0, 3) and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    resumed = torchrun("-m", "train", "fit", "--out", tmp_path / "split", "--data", plankton, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert same_run(tmp_path / "whole", tmp_path / "split")


def test_under_ddp_slow_steps_are_checked_every_step(two_ranks_played_by_one, plankton, tmp_path, monkeypatch):
    """Finding 6: the stop flag was read every `check_every` (50) steps, so with slow steps (a huge image
    size) a SIGTERM was not obeyed for five minutes. Under DDP the ranks must agree, so they check when
    steps are slow at most CHECK_SECONDS apart (here every step: a check_seconds of almost nothing); a
    SIGTERM after step 3 of 5 stops the run at step 3, not at the epoch's end."""
    from train import loop
    monkeypatch.setattr(loop, "CHECK_SECONDS", 1e-9)
    count_training_steps(monkeypatch, lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    config = small_config(training={"epochs": 2, "check_every": 50})
    assert fit(config, plankton, tmp_path / "run") == EXIT_INTERRUPTED
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (0, 3)


def test_the_smoke_check_starts_ranks_as_training_does():
    """`profiling smoke` passed while training would fail: its all-reduce set the device itself. Its check
    now goes through the training program's own start (distributed.Session), here on 2 gloo ranks."""
    from profiling import smoke
    assert "distributed.Session" in smoke.ALL_REDUCE
    assert smoke.all_reduce_check("gloo")() == ("2 processes, gloo, the training program's start: 1 + 2 = 3 on "
                                                "every rank's own device")


# ------------------------------------------------------------------ the peer watch (train/peer_watch.py)


class FakeStore:
    """The rendezvous store's `add`, in a dict; `down` makes it stop answering."""

    def __init__(self):
        self.counts, self.down = {}, False

    def add(self, key, amount):
        if self.down:
            raise RuntimeError("Connection reset by peer")
        self.counts[key] = self.counts.get(key, 0) + amount
        return self.counts[key]


def watching(peers, stale_s=10.0):
    from train.peer_watch import PeerWatch
    now = {"s": 0.0}
    ctx = distributed.Context(rank=0, world_size=len(peers), peers=tuple(peers))
    store = FakeStore()
    watch = PeerWatch(ctx, store, stale_s, activity=lambda: "a training step at epoch 2, step 7",
                      clock=lambda: now["s"])
    return watch, store, now


def test_the_watch_names_a_peer_whose_heartbeat_stopped():
    """Under NCCL a lost or hung peer never reaches Python (torch's watchdog ends the process with SIGABRT,
    no line): the watch reads each rank's heartbeat counter in the rendezvous store and says, in the gloo
    path's one line, which rank went silent, and how it can tell."""
    import socket
    stopped = subprocess.Popen(["sleep", "60"])
    stopped.send_signal(signal.SIGSTOP)
    os.waitpid(stopped.pid, os.WUNTRACED)  # until it is stopped: the signal is delivered asynchronously
    try:
        here = socket.gethostname()
        peers = [(0, here, os.getpid()), (1, "node2", 11), (2, here, 999999999), (3, here, stopped.pid)]
        watch, store, now = watching(peers)
        for second in range(1, 9):  # every peer beats for 8 s
            now["s"] = second
            for rank in (1, 2, 3):
                store.add(f"planktonio/heartbeat/{rank}", 1)
            assert watch.look() is None
        now["s"] = 19.0  # then none does: 11 s of silence against a limit of 10
        line = watch.look()
        assert line == (f"rank 0 on {here}: rank 1 on node2 stopped answering during a training step at epoch 2, "
                        f"step 7 (no heartbeat for 11 s); exiting with 76 for the job to restart from last.pt")
        del watch.seen[1]
        assert "rank 2 on" in watch.look() and "left during" in watch.look() and "process 999999999 is gone" in \
            watch.look()
        del watch.seen[2]
        assert f"rank 3 on {here} stopped answering" in watch.look() and f"process {stopped.pid} is stopped" in \
            watch.look()
        store.down = True
        assert f"rank 0 on {here} left during" in watch.look() and "the rendezvous store there does not answer: " \
            "Connection reset by peer" in watch.look()
    finally:
        stopped.kill()
        stopped.wait()


def test_a_stopped_rank_is_named_by_the_watch_before_the_collective_timeout(plankton, tmp_path):
    """Two ranks started as srun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; rank 0 hosts the store):
    rank 1 stops itself (SIGSTOP) after its 3rd step. With a collective timeout of 120 s and the watch's
    limit at 5 s (tests/fit_with_hooks.py PEER_STALE_S), rank 0 ends within seconds, exit 76, with the one
    line naming rank 1 as stopped: the watch, not gloo's timeout, spoke."""
    import socket
    config = write_config(tmp_path / "c.yaml", training={"epochs": 3, "collective_timeout_s": 120})
    port = 20000 + os.getpid() % 20000
    ranks = []
    for rank in (0, 1):
        env = process_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), PEER_STALE_S="5",
                          **({"FAULT_SIGNAL": "STOP", "FAULT_RANK": "1", "FAULT_AT_STEP": "3"} if rank else {}))
        ranks.append(subprocess.Popen([sys.executable, "-m", "tests.fit_with_hooks", "fit", "--config", str(config),
                                       "--data", str(plankton), "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out, err = ranks[0].communicate(timeout=100)
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    assert ranks[0].returncode == EXIT_PEER_LOST, out + err
    lines = [line for line in err.splitlines() if "exiting with 76" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"rank 1 on {socket.gethostname()} stopped answering during" in lines[0]
    assert "no heartbeat for" in lines[0] and "is stopped" in lines[0]


def test_compile_wraps_the_ddp_model_and_the_cached_rest(two_ranks_played_by_one, plankton, tmp_path,
                                                         monkeypatch):
    """training.compile: PyTorch's order is torch.compile(DDP(model)) (DDP wrapped the compiled module here
    before), and a feature cache's rest is compiled too (it ran uncompiled, silently)."""
    compiled = []  # (what was compiled, what it wraps): names, not the modules (a reference would hold the group)

    def recording_compile(module):
        compiled.append((type(module).__name__, type(getattr(module, "module", None)).__name__))
        return module
    monkeypatch.setattr(executor_module.torch, "compile", recording_compile)
    monkeypatch.setattr(executor_module.torch._dynamo, "reset",
                        lambda: two_ranks_played_by_one.calls.append(("dynamo reset",)))
    config = small_config(model={"freeze": "all-but-head"}, training={"epochs": 1, "compile": True},
                          augment={"train": {"crop": "center", "size": 64, "resize": 72},
                                   "eval": {"crop": "center", "size": 64, "resize": 72}})
    assert fit(config, plankton, tmp_path / "run") == 0
    kinds = [kind for kind, _ in compiled]
    assert kinds[0] == "TinyCNN"  # the model, for evaluation by default
    assert "RecordedDDP" in kinds and "Sequential" in kinds  # the DDP-wrapped rest for steps, the rest itself
    assert dict(compiled)["RecordedDDP"] == "Sequential"  # DDP wraps the (uncompiled) rest of the cut
    # Dynamo's caches let go of the compiled DDP model before the process group is destroyed
    ends = [call[0] for call in two_ranks_played_by_one.calls if call[0] in ("dynamo reset", "destroy_process_group")]
    assert ends == ["dynamo reset", "destroy_process_group"]


# ------------------------------------------------------------------ waits off the collective path

RANK0_WORKS_LONG = """
import datetime, os, sys, time
import torch, torch.distributed as dist
from train import distributed
rank, how = int(os.environ["RANK"]), sys.argv[1]
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
if rank == 0:
    time.sleep(5)  # long host work (the feature store written): past the collective timeout of 2 s
try:
    if how == "store":
        print("rank 0 says:", distributed.first_rank_says("done" if rank == 0 else None, "writing the store"))
    else:
        dist.barrier()
except RuntimeError as error:
    print("failed:", str(error).splitlines()[0][:200])
    sys.exit(1)
total = torch.ones(1)
dist.all_reduce(total)
print("sum", int(total.item()))
"""


@pytest.mark.parametrize("how", ["store", "barrier"])
def test_a_wait_on_rank_0_outlives_the_collective_timeout(tmp_path, how):
    """Rank 0 works 5 s on the host while rank 1 waits, under a collective timeout of 2 s: in a barrier rank 1
    times out (as NCCL's watchdog would end it, with SIGABRT), waiting on the rendezvous store it gets rank
    0's word and both go on to their next collective."""
    port = 20000 + (os.getpid() + 7) % 20000
    ranks = [subprocess.Popen([sys.executable, "-c", RANK0_WORKS_LONG, how], cwd=REPO, text=True,
                              env=process_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        out, err = ranks[1].communicate(timeout=180)  # (importing torch alone takes seconds on a busy machine)
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    said = [line for line in out.splitlines() if not line.startswith("[Gloo]")]
    if how == "store":
        assert ranks[1].returncode == 0 and said == ["rank 0 says: done", "sum 2"], out + err
    else:
        assert ranks[1].returncode == 1 and "failed:" in out and "imed out" in out, out + err


def test_a_wait_on_rank_0_that_expires_is_one_line(monkeypatch):
    import socket
    fake = FakeDist(world=2, rank=1)
    fake.initialized = True
    monkeypatch.setattr(distributed, "dist", fake)
    monkeypatch.setattr(distributed, "POLL_S", 0.01)
    with pytest.raises(distributed.PeerLost) as lost:
        distributed.first_rank_says(None, "writing the feature store /x/features.pt", timeout_s=0.05)
    assert str(lost.value) == (f"rank 1 on {socket.gethostname()}: rank 0 stopped answering during writing the "
                               f"feature store /x/features.pt: no word from it in 0.05 s (distributed.HOST_WORK_S)")


# ------------------------------------------------------------------ a clean end is not a peer lost

ENDS_UNEVENLY = """
import os, sys, time
import torch, torch.distributed as dist
from train import distributed, peer_watch
peer_watch.MAX_STALE_S = 2.0  # the watch's staleness limit: 2 s
slow = int(sys.argv[1])
with distributed.Session(torch.device("cpu"), 60) as ctx:
    total = torch.ones(1)
    dist.all_reduce(total)
    if ctx.rank == slow:
        time.sleep(6)  # work after training (calibration, plots) longer than the staleness limit
print("ended", int(total.item()))
"""


@pytest.mark.parametrize("slow", [0, 1])
def test_a_clean_end_with_a_slow_rank_exits_0_on_both(slow):
    """Rank 0 working after training past the watch's limit flagged rank 1, which had simply finished, as
    lost (exit 76); rank 0 ending first took the rendezvous store (it hosts it under srun) from rank 1's
    still polling watch (exit 76 there). With done marks and rank 0 leaving last, both end with 0."""
    port = 20000 + (os.getpid() + 11 + slow) % 20000
    ranks = [subprocess.Popen([sys.executable, "-c", ENDS_UNEVENLY, str(slow)], cwd=REPO, text=True,
                              env=process_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=180) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    for process, (out, err) in zip(ranks, outputs):
        assert process.returncode == 0 and "ended 2" in out and "exiting with 76" not in err, out + err


def test_rank_0_waits_for_every_rank_done_or_lost(monkeypatch):
    """Rank 0's end (the watch's thread stopped): it waits while a peer still beats, stops waiting for a
    peer done, and names one silent past the limit as lost (its group then left for the exit)."""
    from train.peer_watch import done_key
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    watch, store, now = watching([(0, "node1", 1), (1, "node2", 2), (2, "node3", 3)], stale_s=10.0)
    store.add("planktonio/done/0/2", 1)  # rank 2's mark from torchrun's first attempt: not this one's
    rounds = []

    def beat(_seconds):  # one second per round: rank 1 beats 3 s then is done; rank 2 beats 4 s then goes
        now["s"] += 1
        rounds.append(now["s"])
        if now["s"] <= 3:
            store.add("planktonio/heartbeat/1", 1)
        elif now["s"] == 4:
            store.add(done_key(1), 1)
        if now["s"] <= 4:
            store.add("planktonio/heartbeat/2", 1)
    assert watch.finish(clean=True, sleep=beat) == [2]
    assert store.counts[done_key(0)] == 1 and rounds[-1] == 15  # rank 2 silent from 4 s: > 10 s at 15 s
    assert done_key(1) in store.counts and 1 not in watch.seen
    failed, _, _ = watching([(0, "node1", 1), (1, "node2", 2)], stale_s=10.0)
    assert failed.finish(clean=False, sleep=lambda s: pytest.fail("waited after a failure")) == []


def test_a_done_peer_is_not_flagged_by_the_watch():
    from train.peer_watch import done_key
    watch, store, now = watching([(0, "node1", 1), (1, "node2", 2)], stale_s=10.0)
    store.add(done_key(1), 1)
    now["s"] = 100.0
    assert watch.look() is None


@pytest.mark.parametrize("nccl_said", [True, False])
def test_a_rank_nccl_aborted_after_a_remote_peer_went_is_a_rank_that_saw_another_go(tmp_path, nccl_said):
    """Across nodes NCCL's watchdog often finds a dead peer first and aborts its rank (exit 134) after saying
    the remote peer is gone: the job script names the rank that failed (the OOM killer's), not that one."""
    output = tmp_path / "step.out"
    output.write_text(("[rank0]: NCCL error: remote process exited or there was a network error\n" if nccl_said else
                       "") + "srun: error: node1: task 0: Aborted (core dumped)\n"
                       "srun: error: node2: task 1: Killed\n")
    common = REPO / "slurm" / "common.sh"
    function = f"eval \"$(sed -n '/^describe_failure()/,/^}}/p' '{common}')\""  # (sourcing it runs the job's start)
    said = subprocess.run(["bash", "-c", f"EXIT_PEER_LOST=76; {function}; describe_failure '{output}' 137"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if nccl_said:
        assert said == "rank 1 on node2 failed (srun: Killed)"
    else:
        assert said == "rank 0 on node1, rank 1 on node2 failed (srun: Aborted (core dumped), Killed)"

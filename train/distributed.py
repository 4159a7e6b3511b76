"""One process per GPU under torchrun or srun; NCCL on GPUs, gloo on CPUs.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `srun python -m train`
sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which are read when torchrun's
variables are absent (MASTER_ADDR and MASTER_PORT must then be exported by
the job script). A single process needs none of it.

Which GPU a rank uses: its local rank modulo the GPUs it can see. A site
that gives each task all of the node's GPUs shows four to every task (local
ranks 0-3 take cuda:0-3); a site that binds one GPU per task shows each task
only its own, as cuda:0, and every local rank then takes cuda:0
(SLURM_LOCALID alone would ask for cuda:1-3 there: "invalid device ordinal").
The rank binds that GPU (`torch.cuda.set_device`) before it joins the
process group and hands it to the group (`device_id`): NCCL's object
collectives (the gather of who is who below, checkpoints' random states)
move their bytes through the *current* device, which would be cuda:0 on
every rank of a node ("Duplicate GPU detected ... ncclInvalidUsage",
Megatron-LM#661, torchtitan#1224).

A run holds the process group in a `Session` (a context manager), which
tears it down last, in the one order that cannot hang (see `Session`).

When a peer leaves (killed, out of memory, a lost node) the surviving ranks'
next collective fails with a transport error from deep inside gloo or NCCL,
and when a peer hangs (stopped, a wedged GPU) it blocks until the process
group's timeout (`training.collective_timeout_s`). `PeerLost` turns either
into one line naming the rank and host that left where that can be told, and
the training program exits with EXIT_PEER_LOST for the job script to restart
it from last.pt. docs/training.md.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import os
import re
import socket
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # this rank's device (its own GPU under DDP)
    # (rank, host, pid) of every rank, gathered once at start: who a lost peer was
    peers: tuple[tuple[int, str, int], ...] = field(default=(), compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def from_environment() -> Context:
    """This process's place in the job, from torchrun's or Slurm's variables (no process group needed)."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world == 1:
        return Context()
    return Context(_env_int("RANK", "SLURM_PROCID", default=0), world,
                   _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0))


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that prints and writes files."""
    return from_environment().is_main


def device_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank: its local rank modulo the GPUs this process sees (see the module's docstring)."""
    return local_rank % max(visible, 1)


def rank_device(device: torch.device, ctx: Context, visible: int) -> torch.device:
    """The device a rank computes on: under DDP, its own GPU (device_index); else as asked, with a bare
    "cuda" made explicit (the current device)."""
    if device.type != "cuda":
        return device
    if ctx.distributed:
        return torch.device("cuda", device_index(ctx.local_rank, visible))
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def join(requested: torch.device, timeout_s: float) -> Context:
    """Bind this rank's device, then join the process group (when there are several ranks), collectives
    timing out after timeout_s. The order is the point (module docstring): the GPU first, then the group
    (given that GPU), then the first collective."""
    place = from_environment()
    cuda = requested.type == "cuda"
    device = rank_device(requested, place, torch.cuda.device_count() if cuda else 0)
    if cuda:
        # The current device too: NCCL's object collectives, streams, events and kernels launched
        # without a device argument (cuDNN's, DALI's) then go to this rank's GPU, not cuda:0.
        torch.cuda.set_device(device)
    ctx = replace(place, device=device)
    if not ctx.distributed:
        return ctx
    if cuda:
        # A failure found by NCCL's watchdog is said by this program (peer_watch.py); torch's debug dump
        # would only delay its SIGABRT backstop and print C++ stacks into the job's log.
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), device_id=device if cuda else None)
    peers = [None] * ctx.world_size
    dist.all_gather_object(peers, (ctx.rank, socket.gethostname(), os.getpid()))
    return replace(ctx, peers=tuple(peers))


# Objects that hold the process group (DDP models), so that the Session can check they are gone before it
# destroys the group: one still alive then would free the group later, in its destructor (the hang below).
_holders: weakref.WeakSet = weakref.WeakSet()


def holds_the_group(obj) -> None:
    _holders.add(obj)


def _clear_frames(error: BaseException | None) -> None:
    """Drop the local variables of the frames an exception (and the ones it chains) passed through:
    they would keep a DDP model, and through it the process group, alive past the session."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


class Session:
    """This process's place in a run (`with Session(device, timeout_s) as ctx:`): the device bound and the
    process group joined on the way in, the group destroyed last on the way out, whatever the way out.

    The order on the way out is what keeps a finished run from hanging at exit.
    torch's process-group destructor waits for gloo's worker threads, and when
    it runs inside the destructor of an object that keeps the GIL (DDP's
    Reducer, freed with the model after destroy_process_group dropped torch's
    own reference) it waits with the GIL held, while a worker thread that is
    freeing a finished collective's tensor waits for the GIL: both wait
    forever (pytorch/pytorch#56297, #190489; seen here at the exit of a
    finished 2-rank gloo run). So, before the group is destroyed:
    1. everything that holds the group is gone: the DDP model has one owner,
       the Executor, which the caller closes inside the session (nothing else
       keeps a reference: the Trainer that ran the steps has ended); the
       frames of an exception on its way out are cleared (a step's frame
       holds the DDP model), then reference cycles are collected; what still
       holds the group (`holds_the_group`) is checked, and named;
    2. no collective is pending: every collective here is waited for where it
       is called (DDP's gradient buckets within backward);
    3. destroy_process_group then holds the last reference, and frees the
       group from Python, which lets the GIL go while it waits.
    After a peer was lost the group is not destroyed: a collective left
    pending with a dead peer cannot complete, and destroying the group would
    wait on it. The process ends without it (its exit code says why). Rank 0
    destroys it only once every other rank is done or lost (peer_watch.py).
    """

    def __init__(self, device: torch.device, timeout_s: float):
        self.device, self.timeout_s = device, timeout_s
        self.watch = None

    def __enter__(self) -> Context:
        ctx = join(self.device, self.timeout_s)
        if ctx.distributed:
            self.watch = start_watch(ctx, self.timeout_s)
        return ctx

    def __exit__(self, kind, error, tb) -> None:
        from .signals import Interrupted
        lost = []
        if self.watch is not None:  # its thread first, then the done mark, then (rank 0) the wait for the others
            self.watch.stop()
            if not isinstance(error, PeerLost):
                lost = self.watch.finish(clean=error is None or isinstance(error, Interrupted))
        _clear_frames(error)
        gc.collect()
        if not dist.is_initialized() or isinstance(error, PeerLost):
            return
        if lost:  # a collective with them may be pending: destroying the group would wait on it
            print(f"warning: rank {dist.get_rank()}: rank(s) {', '.join(map(str, lost))} ended without their done "
                  f"mark (no heartbeat); the process group is left for the process's exit", file=sys.stderr,
                  flush=True)
            return
        if len(_holders):  # a bug of ours: say it rather than hang at exit
            print(f"internal error: {len(_holders)} object(s) still hold the process group at the run's end "
                  f"({', '.join(type(h).__name__ for h in _holders)}); it is left for the process's exit",
                  file=sys.stderr, flush=True)
            return
        dist.destroy_process_group()


# ------------------------------------------------------------------ a peer that left


# What gloo and NCCL say when a peer is gone or does not answer.
_PEER_GONE = re.compile(r"connection (?:reset|closed)|broken pipe|timed out|timeout|nccl communicator was aborted|"
                        r"remote process exited|socket|peer", re.IGNORECASE)
_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:\d+")


# What this rank is doing with the others, for a lost peer's line (the Trainer keeps it up to date).
def _starting_up() -> str:
    return "start-up"


_activity: Callable[[], str] = _starting_up


def set_activity(describe: Callable[[], str]) -> None:
    global _activity
    _activity = describe


def start_watch(ctx: Context, timeout_s: float):
    """The heartbeat that says a lost or hung peer in one line under NCCL too (peer_watch.py), where the job
    has a rendezvous store to beat in."""
    from .peer_watch import MAX_STALE_S, PeerWatch, rendezvous_store
    try:
        store = rendezvous_store(min(timeout_s, 30.0))
    except Exception as error:  # the store's own errors: the run goes on, as before the watch
        print(f"warning: rank {ctx.rank}: the peer watch could not reach the rendezvous store ({error}); a lost "
              f"peer is then found by the collectives' own timeout", file=sys.stderr, flush=True)
        return None
    if store is None:
        return None
    return PeerWatch(ctx, store, min(timeout_s, MAX_STALE_S), activity=lambda: _activity()).start()


class PeerLost(Exception):
    """A collective failed because another rank left or hung; the message is the one line to print."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception out of a collective means another rank is gone (not a bug of this one)."""
    backend_error = getattr(dist, "DistBackendError", ())
    return dist.is_initialized() and (isinstance(error, backend_error) or (
        isinstance(error, RuntimeError) and _PEER_GONE.search(str(error)) is not None))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def who_left(ctx: Context, error: BaseException) -> str:
    """The rank that left, as well as can be told: a dead process on this host, or the host gloo names."""
    here = socket.gethostname()
    dead = [(rank, host) for rank, host, pid in ctx.peers if host == here and rank != ctx.rank and not _alive(pid)]
    if dead:
        return ", ".join(f"rank {rank} on {host}" for rank, host in dead)
    match = _ADDRESS.search(str(error))
    if match:
        try:
            host = socket.gethostbyaddr(match.group(1))[0]
        except OSError:
            host = match.group(1)
        ranks = [rank for rank, peer_host, _ in ctx.peers if peer_host in (host, host.split(".")[0])]
        if len(ranks) == 1:
            return f"rank {ranks[0]} on {host}"
        return f"a rank on {host}"
    others = [(rank, host) for rank, host, _ in ctx.peers if rank != ctx.rank]
    if len(others) == 1:  # two ranks: the one that is not this one
        return f"rank {others[0][0]} on {others[0][1]}"
    return "another rank"


def peer_lost(ctx: Context, error: BaseException, operation: str, where: str) -> PeerLost:
    """The one line a surviving rank says, e.g. "rank 1 on node2 left during all_reduce at epoch 3, step 5"."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)[:160]  # gloo prefixes its source file and line
    hung = "timed out" in reason.lower() or "timeout" in reason.lower()
    what = "stopped answering" if hung else "left"
    return PeerLost(f"rank {ctx.rank} on {socket.gethostname()}: {who_left(ctx, error)} {what} during {operation} "
                    f"{where} ({reason})")


# ------------------------------------------------------------------ collectives


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (a no-op in one process)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place, on its device (no host synchronisation of its own)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def collective_device(ctx: Context) -> torch.device:
    """Where a collective's tensors go: the rank's GPU under NCCL, the CPU under gloo."""
    return ctx.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on every rank), in rank order; [tensor] in one process."""
    if not dist.is_initialized():
        return [tensor]
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return gathered


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP sends them before each training forward, but each rank then updates
    its own copy from its own batch: evaluate with rank 0's, the ones it saves.
    """
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


# ------------------------------------------------------------------ waits off the collective path

# The longest the other ranks wait for rank 0's long host work (the feature store hashed, written and
# synced: up to ~100 GB; a million loose files statted on a shared file system).
HOST_WORK_S = 4 * 3600.0
POLL_S = 0.2
_said = itertools.count()  # the how-manieth word of rank 0's this is: every rank asks in the same order


def first_rank_says(message: str | None, what: str = "its check of the input files",
                    timeout_s: float = HOST_WORK_S) -> str | None:
    """Rank 0's `message` on every rank (a verdict only it worked out; None for "done"), the message itself in
    one process. Rank 0 calls this when its work is done; the others call it at once and wait for its word.

    They wait on the rendezvous store, not in a collective: under NCCL a collective pending past the
    process group's timeout (training.collective_timeout_s) is ended by torch's watchdog with SIGABRT and
    no line, and rank 0's host work (`what`) can take longer than that. This wait has its own limit,
    `timeout_s`, and says so in one line when it expires; a rank 0 that died meanwhile is found by the
    peer watch (its heartbeat stops) or by the store that no longer answers."""
    if not dist.is_initialized():
        return message
    key = f"planktonio/rank0-says/{next(_said)}"
    if dist.get_rank() == 0:
        publish(key, message)
        return message
    return wait_for(key, what, "rank 0", timeout_s)


def publish(key: str, value) -> None:
    """A word for the ranks that `wait_for` it (JSON), in the rendezvous store."""
    dist.distributed_c10d._get_default_store().set(key, json.dumps(value))


def wait_for(key: str, what: str, who: str, timeout_s: float = HOST_WORK_S):
    """The word `who` publishes under `key` when it is done with `what`, waited for on the rendezvous store
    (first_rank_says says why), at most timeout_s: then, or if the store stops answering, one line."""
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + timeout_s
    rank, here = dist.get_rank(), socket.gethostname()
    try:
        while not store.check([key]):
            if time.monotonic() > deadline:
                raise PeerLost(f"rank {rank} on {here}: {who} stopped answering during {what}: no word from it "
                               f"in {timeout_s:g} s (distributed.HOST_WORK_S)")
            time.sleep(POLL_S)
        return json.loads(store.get(key))
    except PeerLost:
        raise
    except Exception as error:  # noqa: BLE001 (the store's own errors differ by transport)
        raise PeerLost(f"rank {rank} on {here}: {who} left during {what} (the rendezvous store does not answer: "
                       f"{(str(error).splitlines() or [type(error).__name__])[0]})") from None




def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

"""A two-node Slurm cluster on localhost for the job-script tests.

Debian's Slurm (slurmctld, slurmd, slurm-client) and munge, started directly
(there is no systemd), each with its own files in a temporary folder: a munge
key and socket, slurm.conf, gres.conf with four "GPUs" a node that are
symlinks to /dev/null (Slurm needs device files; torch still sees no CUDA, so
jobs run in CPU mode). Only the daemons started here are stopped, by pid.

Two nodes on one host, as Slurm's multiple-slurmd setup has them: one
NodeName line per node with its own Port=, `%n` (the node's name) in
SlurmdSpoolDir, SlurmdPidFile and SlurmdLogFile, and one `slurmd -N <node>`
each. Each node has its own loopback address (127.0.0.1, 127.0.0.2: Linux
routes all of 127/8 to lo), so that a job script that took its MASTER_ADDR
from the wrong node would be seen to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
DAEMONS = ("munged", "slurmctld", *(f"slurmd-{node}" for node in NODES))  # their pid files, in start order
# squeue reasons that mean the job will never start on this cluster.
NEVER_RUNS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "DependencyNeverSatisfied"}


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "Slurm tests start slurmd, which needs root"
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol") if not shutil.which(d)]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing; .ci/run installs Debian's packages)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int = 40, gpus: int = 4):
        # Cirrus GPU nodes' shape (40 cores, 4 GPUs each), whatever this machine
        # has: SlurmdParameters=config_overrides lets each slurmd accept it.
        self.root = Path(root)
        self.cpus, self.gpus = cpus, gpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for folder in ("state", "log", *(f"spool/{node}" for node in NODES), *(f"dev/{node}" for node in NODES)):
            (r / folder).mkdir(parents=True, exist_ok=True)
        for node in NODES:
            for i in range(self.gpus):
                (r / "dev" / node / f"gpu{i}").symlink_to("/dev/null")
        (r / "munge.key").write_bytes(os.urandom(1024))
        (r / "munge.key").chmod(0o600)
        r.chmod(0o755)  # munged wants a socket directory others can reach
        nodes = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.{i} NodeHostname={socket.gethostname()} Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=8000 Gres=gpu:{self.gpus} State=UNKNOWN"
            for i, node in enumerate(NODES, start=1))
        # cred_expire: a requeued job waits this long before it may start again
        # (Slurm's default, 120 s, would be most of a requeue test's time).
        self.conf.write_text(f"""\
ClusterName=planktonio-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock,cred_expire=15
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=5
{nodes}
PartitionName=gpu Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "gres.conf").write_text("".join(f"NodeName={node} Name=gpu File={r}/dev/{node}/gpu[0-{self.gpus - 1}]\n"
                                             for node in NODES))

    def start(self, timeout: float = 30) -> None:
        self._write_config()
        r = self.root
        subprocess.run(["munged", "--force", f"--socket={r}/munge.sock", f"--key-file={r}/munge.key",
                        f"--log-file={r}/log/munged.log", f"--pid-file={r}/munged.pid",
                        f"--seed-file={r}/munged.seed"], check=True, env=self.env)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
            if state.stdout.split() == ["idle"] * len(NODES):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm did not come up: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the daemons this cluster started, by the pids they wrote."""
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        deadline = time.time() + 20  # let cancelled jobs end before their slurmd goes
        while time.time() < deadline and self.run("squeue", "-h").stdout.strip():
            time.sleep(0.5)
        pids = []
        for name in reversed(DAEMONS):
            try:
                pid = int((self.root / f"{name}.pid").read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 15
        while pids and time.time() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            time.sleep(0.2)
        for pid in pids:  # still there after 15 s: ours, so ours to kill
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        text = []
        for log in sorted((self.root / "log").glob("*.log")):
            text.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:]))
        return "\n".join(text)

    # ------------------------------------------------------------------ jobs

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env={**self.env, **kwargs.pop("env", {})},
                              **kwargs)

    def job_state(self, job_id: str) -> dict:
        """Fields of `scontrol show job` (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        """Poll squeue until the job (all array tasks) left the queue; its final state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queued = self.run("squeue", "-h", "-j", job_id, "-o", "%r").stdout.split()
            if not queued:
                return self.job_state(job_id)
            stuck = set(queued) & NEVER_RUNS
            if stuck:
                raise RuntimeError(f"job {job_id} cannot run here: {', '.join(stuck)}")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still queued after {timeout} s: {self.job_state(job_id)}")

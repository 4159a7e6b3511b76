"""Host memory counted once per node (planktonio/memory.py): the node's available memory, within the job's
memory cgroup (v1 and v2, read from a fake cgroup tree), divided by the ranks on the node."""

from __future__ import annotations

import pytest

from planktonio import memory

GIB = 2**30


def fake_cgroup(tmp_path, version: str, job_limit: str, used: int, inactive: int = 0):
    """A cgroup tree as Slurm makes it: the job's folder holds the limit, the task's folder below it
    (where the process is) has none of its own."""
    root = tmp_path / "sys-fs-cgroup"
    if version == "v2":
        proc = "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n"
        job, task = root / "system.slice/slurmstepd.scope/job_7", "step_0/user/task_0"
        files, stat_key = ("memory.max", "memory.current"), "inactive_file"
        unlimited = "max"
    else:
        proc = "5:cpuset:/slurm/uid_1/job_7\n4:memory:/slurm/uid_1/job_7/step_0/task_0\n0::/\n"
        job, task = root / "memory/slurm/uid_1/job_7", "step_0/task_0"
        files, stat_key = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
        unlimited = "9223372036854771712"
    (job / task).mkdir(parents=True)
    (job / files[0]).write_text(job_limit + "\n")
    (job / files[1]).write_text(f"{used}\n")
    (job / "memory.stat").write_text(f"anon 5\n{stat_key} {inactive}\n")
    (job / task / files[0]).write_text(unlimited + "\n")
    (job / task / files[1]).write_text(f"{used}\n")
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text(proc)
    return proc_cgroup, root, job


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_four_ranks_share_the_node_within_the_job_s_cgroup_limit(tmp_path, monkeypatch, version):
    """A node with 200 GiB available, a job limited to 64 GiB of which 8 GiB are used (2 of them page cache
    the kernel can drop), 4 ranks: each rank may keep half of the 58 GiB the limit leaves, over 4: 7.25 GiB,
    not half of the node's 200 GiB each (4 ranks x 100 GiB)."""
    proc_cgroup, root, job = fake_cgroup(tmp_path, version, str(64 * GIB), 8 * GIB, 2 * GIB)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: type("VM", (), {"available": 200 * GIB})())
    host = memory.host_memory(proc_cgroup, root, {"LOCAL_WORLD_SIZE": "4"})
    assert (host.room, host.limit, host.cgroup, host.ranks) == (58 * GIB, 64 * GIB, str(job), 4)
    assert host.budget == int(58 * GIB * memory.SHARE) // 4
    assert host.describe() == (f"7.2 GiB per rank: half of 58.0 GiB available within the job's memory limit "
                               f"(64.0 GiB, {job}), over 4 ranks on this node")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_no_cgroup_limit_leaves_the_node_s_memory_over_its_ranks(tmp_path, monkeypatch, version):
    unlimited = "max" if version == "v2" else "9223372036854771712"
    proc_cgroup, root, _ = fake_cgroup(tmp_path, version, unlimited, 8 * GIB)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: type("VM", (), {"available": 200 * GIB})())
    host = memory.host_memory(proc_cgroup, root, {"SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"})
    assert (host.room, host.ranks, host.budget) == (None, 2, 50 * GIB)
    assert host.describe() == "50.0 GiB per rank: half of 200.0 GiB available, over 2 ranks on this node"
    assert memory.host_memory(tmp_path / "absent", root, {}).budget == 100 * GIB  # no /proc/self/cgroup: none


def test_the_process_budget_in_host_memory_is_the_node_s_share(monkeypatch):
    monkeypatch.setattr(memory.Budget, "_budgets", {})
    monkeypatch.setattr(memory, "host_memory", lambda: memory.HostMemory(40 * GIB, 24 * GIB, 32 * GIB, "/job", 4))
    budget = memory.Budget.of(memory.HOST)
    assert budget.limit == 3 * GIB and "over 4 ranks on this node" in budget.said

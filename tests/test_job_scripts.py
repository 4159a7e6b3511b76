"""The Slurm job scripts' shell, without Slurm: shellcheck, and what slurm/common.sh does with the names it is
given. (The jobs themselves run on a real two-node Slurm in test_slurm.py, the slow tier.)"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from .helpers import REPO

SCRIPTS = ["slurm/common.sh", "slurm/submit", "slurm/sweep", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sbatch"))]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (Debian: shellcheck)")
def test_the_job_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("tmpdir", ["it's here", "quote' $(touch pwned) '", "$(touch pwned)"])
def test_a_temporary_folder_with_quotes_or_commands_in_its_name_is_only_a_name(tmp_path, tmpdir):
    """Finding 8: `trap "rm -f '$output'" EXIT` put the file's name into shell text: a TMPDIR with an
    apostrophe made a finished job exit 2 (Slurm: FAILED, its dependants never start), one with '$(cmd)'
    ran the command. The job script's step, with a fake srun and venv: exit 0, nothing run, no file left."""
    venv, bin_dir = tmp_path / "venv" / "bin", tmp_path / "bin"
    venv.mkdir(parents=True)
    bin_dir.mkdir()
    executable(venv / "python", "#!/bin/sh\nexit 0\n")  # the doctor's verdict: ok
    (venv / "activate").write_text(f'PATH="{venv}:$PATH"\n')
    executable(bin_dir / "srun", '#!/bin/sh\necho "srun $*"\n')
    temporary = tmp_path / "tmp" / tmpdir
    temporary.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(temporary),
           "PLANKTONIO_ROOT": str(REPO), "PLANKTONIO_VENV": str(venv.parent), "PLANKTONIO_RUNS": str(tmp_path / "runs"),
           "SLURM_JOB_ID": "7"}
    common = REPO / "slurm" / "common.sh"
    done = subprocess.run(["bash", "-c", f"source '{common}'; run_training"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "srun --kill-on-bad-exit=0" in done.stdout
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()
    assert list(temporary.iterdir()) == []  # the step's output file, removed at exit

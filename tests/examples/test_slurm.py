"""The SLURM recipes: valid bash, and rendered (run with stub srun/scontrol/torchrun) into the
torchrun command and environment a cluster job would get.

Run: python -m pytest tests/examples/test_slurm.py -q
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "examples" / "slurm"
STUBS = {
    # srun: drop its own options, run the command (once: one node is enough to render)
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": "#!/bin/bash\necho node-a\necho node-b\n",
    "torchrun": '#!/bin/bash\npython3 -c \'import json, os, sys; json.dump({"argv": sys.argv[1:],'
    ' "env": dict(os.environ)}, open(os.environ["RENDER_TO"], "w"))\' "$@"\n',
}


def render(tmp_path: Path, script: str, *extra: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "USER": "tester",
        "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "csd", "SLURM_CPUS_PER_TASK": "64", "CSD_VENV": str(tmp_path / "venv"),
        "SCRATCH": str(tmp_path / "scratch"), "RENDER_TO": str(tmp_path / "render.json"),
        "CUDA_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "0",
    }  # fmt: skip
    proc = subprocess.run(["bash", str(SLURM / script), *extra], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "render.json").read_text())


@pytest.mark.parametrize("script", ["cuda.sbatch", "rocm-mi250x.sbatch"])
def test_script_is_valid_bash_and_renders_a_multi_node_torchrun(tmp_path, script):
    subprocess.run(["bash", "-n", str(SLURM / script)], check=True)
    out = render(tmp_path, script, "--learning_rate", "5e-7")
    argv = out["argv"]
    opt = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert opt["--nnodes"] == "2" and opt["--nproc_per_node"] == "8"
    assert opt["--rdzv_backend"] == "c10d" and opt["--rdzv_endpoint"] == "node-a:29500"
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["csd_fast", "train"]
    assert argv[-2:] == ["--learning_rate", "5e-7"]  # extra sbatch arguments reach csd train
    assert "--resume" not in argv  # nothing to resume from yet
    assert out["env"]["HF_HOME"] == str(tmp_path / "scratch" / "hf")
    assert out["env"]["OMP_NUM_THREADS"] == "8"


def test_rocm_script_uses_hip_visible_devices_only_and_node_local_caches(tmp_path):
    env = render(tmp_path, "rocm-mi250x.sbatch")["env"]
    assert env["HIP_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert "CUDA_VISIBLE_DEVICES" not in env and "ROCR_VISIBLE_DEVICES" not in env
    assert env["MIOPEN_USER_DB_PATH"].startswith("/tmp/")
    assert env["MIOPEN_CUSTOM_CACHE_DIR"] == env["MIOPEN_USER_DB_PATH"]
    assert Path(env["MIOPEN_USER_DB_PATH"]).is_dir()
    assert "NCCL_SOCKET_IFNAME" in env


def test_a_requeued_job_resumes(tmp_path):
    (tmp_path / "scratch" / "runs" / "csd-77" / "checkpoint-500").mkdir(parents=True)
    argv = render(tmp_path, "cuda.sbatch")["argv"]
    assert "--resume" in argv

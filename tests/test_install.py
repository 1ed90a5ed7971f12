"""The project installs with pip into a fresh virtual environment (offline, no build isolation) and works outside
the repository: its packages and entry-point modules import, and the console scripts run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import REPO


def run(command: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_pip_install_into_a_fresh_venv_then_use_it_from_elsewhere(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "outputs", "runs", "__pycache__",
                                                                 "*.egg-info", "build", "benchmarks", "tests"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    # The dependencies (pip and setuptools too) are the ones this suite runs with, seen through a .pth file.
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout
    Path(purelib.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", source], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plugins = run([python, "-c", "from importlib.metadata import entry_points; "
                            "print([p.value for p in entry_points(group='vllm.general_plugins')])"], cwd=tmp_path).stdout
    assert "models.serving:register" in plugins  # vLLM finds the serving plugin once the project is installed
    code = ("import train_base, evaluate_joint, train_mlpmem_offline, utils.artifacts.knn_targets, models.joint, "
            "models.training.modes, knn_utils.knnlm, downstream.eval_qa, demo.generation_example, utils.embedded_corpus\n"
            "print(models.joint.__file__)")
    where = run([python, "-c", code], cwd=elsewhere).stdout.strip()
    assert str(venv) in where and str(REPO) not in where
    result = subprocess.run([venv / "bin" / "mlpmem-evaluate", "--lambda", "0.3"], cwd=elsewhere, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "did you mean --lmbda?" in result.stderr
    help_text = run([venv / "bin" / "mlpmem-train-offline", "--help"], cwd=elsewhere).stdout
    assert "--knn_dstore_path" in help_text

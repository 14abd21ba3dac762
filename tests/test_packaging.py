"""The wheel carries the bundled model and MEND editor and works without the source tree.

Builds the wheel from a copy of the build inputs (a stale ``build/`` folder cannot leak into
it), installs it with ``--no-deps`` into a fresh virtual environment, makes the dependencies
visible through a ``.pth`` line naming this environment's site-packages (installing torch
again would take minutes and need the network), and runs ``workbench info``, a trace, a ROME
edit and a MEND edit from a temporary folder, with ``PYTHONPATH`` and ``WORKBENCH_ASSETS`` unset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import workbench

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md", "workbench",
                "assets")
"""What a wheel is built from (everything else in the repository stays out of it)."""

SCRIPT = """
import json, sys
from importlib.metadata import version
import workbench as wb
from workbench.editing.mend import shipped_editor_path
from workbench.loading import assets_dir
from workbench.report import known_facts

model = wb.load_model("toy-facts", device="cpu")
fact = known_facts(model, wb.load_facts("toy-facts"), limit=1)[0]
traced = wb.trace(model, fact.prompt, subject=fact.subject, kinds=("mlp",), samples=3, seed=1)
rome = wb.rome(model, fact, hparams={"mom2_n_tokens": 20000})
mend = wb.mend(model, fact)
print(json.dumps({"module": wb.__file__, "assets": str(assets_dir()), "editor": str(shipped_editor_path()),
                  "version": wb.__version__, "dist_version": version("workbench"), "sys_path": sys.path,
                  "p_clean": traced.p_clean, "mlp_cells": list(traced.scores["mlp"].shape),
                  "rome_reached": rome.info["reached"], "mend_reached": mend.info["reached"]}))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)])
    (built,) = dist.glob("workbench-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the wheel (dependencies seen through a .pth line)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)])
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # This environment's site-packages may lie inside the checkout (CI's .venv does): that is fine, since an
    # editable install's finder is a .pth file there, which a .pth line does not run; what must not be
    # reachable is the source package itself, checked here and on the installed side below.
    deps = [p for p in dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()]) if os.path.isdir(p)]
    assert not [p for p in deps if (Path(p) / "workbench" / "__init__.py").exists()], deps
    (Path(purelib) / "_workbench_test_deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "WORKBENCH_ASSETS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp / "cache"), WORKBENCH_PROGRESS="log")
    return env


def test_wheel_carries_assets_and_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("toy-facts/config.json", "toy-facts/model.safetensors", "toy-facts/tokenizer.json",
                "toy-facts/world.json", "toy-facts/counterfact.json", "mend-toy/editor.safetensors"):
        assert f"workbench/assets/{rel}" in names
    assert not [n for n in names if n.endswith((".tmp", "checkpoint.pt", "best.safetensors", ".gitignore"))]
    assert not [n for n in names if n.startswith("assets/")], "assets must live inside the package"
    meta = zipfile.ZipFile(wheel).read(f"workbench-{workbench.__version__}.dist-info/METADATA").decode()
    assert f"Version: {workbench.__version__}\n" in meta
    assert "License-Expression: MIT\n" in meta
    assert "Project-URL" not in meta
    assert wheel.stat().st_size < 20e6, f"wheel is {wheel.stat().st_size / 1e6:.1f} MB"


def test_installed_wheel_runs_offline_without_the_source_tree(installed, tmp_path):
    env = _clean_env(tmp_path)
    # The console script and the library run side by side: each spends most of its time importing torch.
    info = subprocess.Popen([str(installed / "bin" / "workbench"), "info"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = _run([str(installed / "bin" / "python"), "-c", SCRIPT], cwd=tmp_path, env=env)
    stdout, stderr = info.communicate(timeout=300)
    assert info.returncode == 0, f"workbench info failed ({info.returncode}):\n{stdout}\n{stderr}"
    assert re.search(r"^spec\s+toy-facts$", stdout, re.M) and re.search(r"^n_layers\s+6$", stdout, re.M), stdout

    out = json.loads(done.stdout.strip().splitlines()[-1])
    venv = installed.resolve()
    for key in ("module", "assets", "editor"):
        assert Path(out[key]).resolve().is_relative_to(venv), f"{key} {out[key]} is not inside the fresh venv"
    sources = [p for p in out["sys_path"] if p and not Path(p).resolve().is_relative_to(venv)
               and (Path(p).resolve() == REPO or (Path(p) / "workbench" / "__init__.py").exists())]
    assert not sources, f"the source tree is on the installed side's path: {sources}"
    assert out["version"] == out["dist_version"] == workbench.__version__
    assert out["p_clean"] > 0.5 and out["mlp_cells"][1] == 6
    assert out["rome_reached"] and out["mend_reached"]
    assert "\r" not in done.stderr and "layer_stats L0: 100%" in done.stderr, done.stderr


def test_version_is_one_number_everywhere():
    """``pyproject.toml`` reads the version from the package; the changelog's newest entry is that version."""
    pyproject = (REPO / "pyproject.toml").read_text()
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \["version"\]', project, re.M) and not re.search(r"^version =", project, re.M)
    assert re.search(r'^version = \{ attr = "workbench.__version__" \}', pyproject, re.M)
    assert re.search(r'^license = "MIT"', pyproject, re.M)
    heads = re.findall(r"^## (\d+\.\d+\.\d+)", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert heads and heads[0] == workbench.__version__, heads

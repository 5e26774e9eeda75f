"""The package installs from a wheel and runs outside the checkout, with the shipped data.

The wheel is built from the checkout, installed (without dependencies) into a fresh virtual
environment in a temporary directory, which reuses the pinned packages already installed in this
environment through a ``.pth`` line; the command then runs from a directory that is not the
checkout, so only the wheel's copy of the package and data can be found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a clean copy of the sources (setuptools' build/ directory could hold stale modules)."""
    import shutil

    src = tmp_path_factory.mktemp("src") / "dleaf-analysis"
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "results", "runs",
                                                                   "__pycache__", "*.egg-info", "figures", "notebooks"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True)
    (whl,) = dist.glob("dleaf_analysis-*.whl")
    return whl


def test_wheel_holds_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = REPO_ROOT / "data"
    shipped = {f"dleaf_analysis/data/{p.relative_to(data).as_posix()}" for p in data.rglob("*")
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data).parts)}
    assert shipped, "data/ is empty"
    assert shipped <= names, sorted(shipped - names)[:10]
    assert "dleaf_analysis/cli.py" in names and "dleaf_analysis/studies/base.py" in names and "dleaf_analysis/interventions/fused.py" in names


@pytest.mark.slow
def test_wheel_runs_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "fresh-env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "reuse-pinned.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DLEAF_DATA_DIR")}
    where = subprocess.run([str(py), "-c", "import dleaf_analysis.paths as p; print(p.DATA_DIR)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where  # the wheel's data, not the checkout's
    pkg = Path(where).parent

    def snapshot() -> dict:  # every file of the installed package (bytecode caches aside) and its mtime
        return {f: f.stat().st_mtime_ns for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts}

    before = snapshot()
    v = subprocess.run([str(env_dir / "bin" / "dleaf"), "--version"], cwd=work, env=env, capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("dleaf-analysis "), v.stderr
    r = subprocess.run([str(env_dir / "bin" / "dleaf"), "evaluate", "--split", "dev", "--limit", "2", "--json"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["protocol"]["model"]["weights_hash"] and res["summary"]
    # the main job and the figures finish outside the checkout: the report is written, absent inputs skipped
    r = subprocess.run([str(env_dir / "bin" / "dleaf"), "reproduce", "--quick", "--out", "res"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (work / "res" / "report.md").read_text()
    assert "## Methods on the embedded model" in report and "### POPE" in report and "## Figures" in report
    r = subprocess.run([str(env_dir / "bin" / "dleaf"), "figures", "--results", "res", "--out", "figs", "--n-images",
                        "2", "--only", "sensitivity_curves", "--only", "fig4_suppression_methods"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "figs" / "fig4_suppression_methods.png").stat().st_size > 0
    assert (work / "figs" / "sensitivity_curves.png").stat().st_size > 0
    assert snapshot() == before  # nothing written into the installed package (its shipped data included)

"""``python -m build`` makes an sdist and a wheel that install and run outside the source tree.

The wheel is installed with ``--no-deps`` into a fresh virtual environment that sees this
environment's dependencies (torch, numpy, scipy, tqdm) through a ``.pth`` file but not its
editable lossprune, and the README's usage example runs there from an empty directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.test_readme import readme_example

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("build", reason="needs the 'build' package (test extra)")


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist, then a wheel built from the sdist (what ``python -m build`` does by default)."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools, so no download is needed.
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT)
    return out


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_build_makes_an_sdist_and_a_wheel_with_the_package(dist):
    version = project_version()
    (sdist,) = dist.glob(f"lossprune-{version}.tar.gz")
    (wheel,) = dist.glob(f"lossprune-{version}-py3-none-any.whl")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE", "src/lossprune/__init__.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"lossprune-{version}.dist-info/METADATA").decode()
    assert "lossprune/py.typed" in names, "PEP 561 marker missing: type hints would be ignored"
    assert "lossprune/curvature/__init__.py" in names and "lossprune/criteria/base.py" in names
    assert not any(name.startswith("tests/") for name in names)
    for requirement in ("torch", "numpy", "scipy", "tqdm"):
        assert f"Requires-Dist: {requirement}" in metadata


def test_wheel_installs_into_a_fresh_venv_and_runs_the_readme_example(dist, tmp_path):
    (wheel,) = dist.glob("lossprune-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    fresh_site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    # The dependencies come from this environment; lossprune (editable here) does not: an
    # editable install is activated by a .pth file, which a path added this way does not process.
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "example.py").write_text(readme_example())
    check = (
        "import importlib.metadata, pathlib, runpy, lossprune\n"
        "print(lossprune.__version__)\n"
        "print(importlib.metadata.version('lossprune'))\n"
        "print(pathlib.Path(lossprune.__file__).resolve())\n"
        "namespace = runpy.run_path('example.py')\n"
        "print('sparsity', round(namespace['pruner'].sparsity(), 4))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(python), "-c", check], cwd=workdir, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    version, metadata_version, location = lines[0], lines[1], Path(lines[2])
    assert version == metadata_version == project_version()
    assert fresh_site.resolve() in location.parents, f"imported {location}, not the wheel"
    assert "stage 14" in result.stdout and lines[-1] == "sparsity 0.9"

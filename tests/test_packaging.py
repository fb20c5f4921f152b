"""Packaging: the installed package imports from outside the repo; the client never imports torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPORT_ALL = (
    "import latentd.vae, latentd.server.app, latentd.client, latentd.client.cli, latentd.v1.tensors, latentd.v1, "
    "latentd.archive.reader; "
    "print(latentd.vae.__file__)"
)


def _python(code: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *kwargs.pop("flags", []), "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_installed_package_imports_from_outside_the_repo(tmp_path):
    result = _python(IMPORT_ALL, tmp_path)
    assert result.returncode == 0, result.stderr


def test_client_and_cli_help_do_not_import_torch(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "import latentd.client, latentd.v1.tensors\n"
        "from latentd.client import LatentClient, AsyncLatentClient, InvalidInputError\n"
        "from latentd.client.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0 and main(['roundtrip', '--help']) == 0 and main(['serve', '--help']) == 0\n"
        "import latentd.vae.errors, latentd.vae.registry\n"
        "heavy = sorted(m for m in ('torch', 'diffusers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("latentd")
    result = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("latentd ")


@pytest.mark.slow
def test_wheel_holds_every_package_and_imports_without_the_repo(tmp_path):
    """`pip install .` path: build a wheel, install it into a folder, import it from there alone."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("latentd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for folder, package in (("vae", "latentd/vae"), ("server", "latentd/server"), ("client", "latentd/client"),
                            ("archive", "latentd/archive"), ("protos/latentd/v1", "latentd/v1")):
        for source in (REPO / folder).rglob("*.py"):
            assert f"{package}/{source.relative_to(REPO / folder).as_posix()}" in names, source
    assert "latentd/client/py.typed" in names and "latentd/v1/latentd.proto" in names
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    # -S: no site processing, so the editable install's finder is not active; the dependencies
    # come from this environment's site-packages on the path, latentd only from the wheel.
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    result = _python(IMPORT_ALL, tmp_path, flags=["-S"], env={"PYTHONPATH": f"{target}:{site_packages}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target))

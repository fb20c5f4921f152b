"""The import rules of docs/architecture.md, held against the code: imports flow down the layers only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder (relative to the repo) -> layer; the first matching prefix wins.
LAYER_OF_FOLDER = (
    ("client/cli/", "cli"),
    ("archive/", "archive"),
    ("client/", "sdk"),
    ("bench/", "bench"),
    ("evaluate/", "evaluate"),
    ("server/", "server"),
    ("vae/", "vae"),
    ("protos/latentd/v1/", "contract"),
)
# Import name prefix -> layer; the first matching prefix wins.
LAYER_OF_MODULE = (
    ("latentd.client.cli", "cli"),
    ("latentd.archive", "archive"),
    ("latentd.client", "sdk"),
    ("latentd.bench", "bench"),
    ("latentd.evaluate", "evaluate"),
    ("latentd.server", "server"),
    ("latentd.vae", "vae"),
    ("latentd.v1", "contract"),
)
# What each layer may import besides itself.
ALLOWED = {
    "contract": set(),
    "vae": {"contract"},
    "sdk": {"contract"},
    "server": {"vae", "contract"},
    "archive": {"sdk", "vae", "contract"},
    "evaluate": {"archive", "server", "sdk", "vae", "contract"},
    "bench": {"evaluate", "archive", "server", "sdk", "vae", "contract"},
    "cli": {"bench", "evaluate", "archive", "server", "sdk", "vae", "contract"},
}


def _layer(table, name: str) -> str | None:
    return next((layer for prefix, layer in table if name.startswith(prefix)), None)


def _package_of(path: Path) -> str:
    """The import name of a source file's package, from the package-dir mapping of pyproject.toml."""
    relative = path.relative_to(REPO).as_posix()
    for prefix, package in (("client/", "latentd.client"), ("archive/", "latentd.archive"),
                            ("bench/", "latentd.bench"), ("evaluate/", "latentd.evaluate"), ("server/", "latentd.server"), ("vae/", "latentd.vae"),
                            ("protos/latentd/v1/", "latentd.v1")):
        if relative.startswith(prefix):
            parts = relative[len(prefix):].split("/")[:-1]
            return ".".join([package, *parts])
    raise AssertionError(relative)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every latentd import in a file, function-local ones included."""
    found = []
    package = _package_of(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("latentd.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("latentd."):
                found += [(node.lineno, module)]
    return found


def _sources() -> list[Path]:
    files = []
    for folder, _ in LAYER_OF_FOLDER:
        files += [p for p in (REPO / folder).rglob("*.py") if "_pb2" not in p.name]
    return sorted(set(files))


def violations() -> list[str]:
    found = []
    for path in _sources():
        relative = path.relative_to(REPO).as_posix()
        source = _layer(LAYER_OF_FOLDER, relative)
        for line, module in imports_of(path):
            target = _layer(LAYER_OF_MODULE, module)
            if target is not None and target != source and target not in ALLOWED[source]:
                found.append(f"{relative}:{line} ({source}) imports {module} ({target})")
    return found


def test_imports_flow_down_the_layers():
    assert violations() == []


def test_the_checker_sees_a_violation():
    """A runtime module importing a tool is caught (so the rule above cannot pass by seeing nothing)."""
    fake = REPO / "vae" / "_architecture_probe.py"
    fake.write_text("def f():\n    from latentd.bench.codec import bench_codec\n    from ..server import app\n")
    try:
        found = violations()
    finally:
        fake.unlink()
    assert any("vae/_architecture_probe.py:2 (vae) imports latentd.bench.codec (bench)" in v for v in found)
    assert any("vae/_architecture_probe.py:3 (vae) imports latentd.server (server)" in v for v in found)


@pytest.mark.parametrize("module", ["latentd.client", "latentd.client.errors", "latentd.v1.tensors",
                                    "latentd.archive.reader", "latentd.vae.options", "latentd.server.settings"])
def test_the_sdk_and_contract_load_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imported torch"


def test_the_command_line_parser_loads_no_torch():
    """Every subcommand imports what it runs inside `run`, so `latentd health` or `--help` starts in a
    fraction of a second instead of the seconds torch and diffusers take to import."""
    code = ("import sys; from latentd.client.cli import build_parser; build_parser(); "
            "sys.exit(bool({'torch', 'diffusers', 'grpc'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "building the CLI parser imported torch"

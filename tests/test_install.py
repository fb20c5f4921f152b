"""deploy/install/torch_cpu.py: the CPU-only torch install step of the Makefile."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "install" / "torch_cpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("torch_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(*names: str) -> dict:
    return {"install": [{"metadata": {"name": name, "version": "1"}} for name in names]}


def test_a_plan_with_cuda_libraries_is_refused_and_a_cpu_plan_is_not():
    torch_cpu = _module()
    assert torch_cpu.cuda_packages(_plan("torch", "sympy", "filelock")) == []
    assert torch_cpu.cuda_packages(_plan("torch", "nvidia-cudnn-cu12", "NVIDIA-cublas-cu12", "triton")) == [
        "nvidia-cublas-cu12", "nvidia-cudnn-cu12", "triton"]
    assert torch_cpu.cuda_packages({}) == []


def test_an_index_that_refuses_connections_is_unreachable_at_once():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert not _module().index_reachable(f"http://127.0.0.1:{port}/whl/cpu", timeout=2)
    assert not _module().index_reachable("not a url")


def test_the_makefile_installs_torch_through_the_script():
    makefile = (SCRIPT.parents[2] / "Makefile").read_text()
    assert "deploy/install/torch_cpu.py $(TORCH_VERSION) $(TORCH_CPU_INDEX)" in makefile

"""Install PyTorch's CPU build into this interpreter's environment, and never a CUDA build.

PyTorch's CPU wheels live on their own index. Where that index cannot be reached (an offline mirror,
a machine that reaches only PyPI), pip would retry it for over a minute per package and then find
the wheel elsewhere anyway (a local wheel folder or mirror in the pip configuration), or fall back
to PyPI's CUDA build of several GB. So the index is probed first, with a short timeout, and without
it the plan pip resolves is read before anything is downloaded: a plan that holds NVIDIA's CUDA
libraries is refused.

Usage: python torch_cpu.py VERSION INDEX_URL
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 5


def index_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def cuda_packages(report: dict) -> list[str]:
    """The packages of a `pip install --report` plan that are NVIDIA CUDA libraries."""
    names = [item["metadata"]["name"].lower() for item in report.get("install", [])]
    return sorted(name for name in names if name.startswith("nvidia-") or name == "triton")


def pip(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)


def main(argv: list[str]) -> int:
    version, index = argv
    requirement = f"torch=={version}"
    if index_reachable(index):
        pip("install", requirement, "--extra-index-url", index)
        return 0
    print(f"{index} cannot be reached; checking that pip's plan holds no CUDA build", flush=True)
    plan = json.loads(pip("install", requirement, "--dry-run", "--quiet", "--report", "-", capture=True).stdout)
    refused = cuda_packages(plan)
    if refused:
        print(f"refusing a CUDA build of torch on a machine without an NVIDIA GPU (it would bring "
              f"{', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}); make the CPU wheel reachable "
              f"(TORCH_CPU_INDEX or a local wheel folder in pip's configuration)", file=sys.stderr)
        return 1
    pip("install", requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

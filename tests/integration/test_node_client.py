"""The contract stands on its own: a Node.js client built from protos/ alone encodes and decodes an image."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import smooth_image

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "client" / "examples" / "node"


@pytest.fixture(scope="module")
def node_example(tmp_path_factory):
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js is not installed")
    folder = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json", "encode_decode.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    installed = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=folder,
                               capture_output=True, text=True, timeout=300)
    if installed.returncode != 0:
        pytest.skip(f"npm could not install @grpc/grpc-js (no registry?): {installed.stderr[-300:]}")
    return folder


@pytest.mark.slow
def test_node_client_round_trips_an_image(node_example, start_server, tmp_path):
    harness = start_server(max_batch_size=1)
    source, target = tmp_path / "in.png", tmp_path / "out.png"
    image = smooth_image(40, 56, seed=3)
    Image.fromarray(image).save(source)
    result = subprocess.run(["node", str(node_example / "encode_decode.js"), harness.address, str(source),
                             str(target), str(REPO / "protos")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dtype"] == "FLOAT16" and report["shape"] == [4, 20, 28] and report["bytes"] == 4 * 20 * 28 * 2
    decoded = np.asarray(Image.open(target))
    expected = harness.codec().roundtrip(image)
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - expected.astype(int)).max() <= 2

"""The service on a CUDA device under concurrent load: pipelined batches, busy time and device memory in the metrics.
Marked `gpu`: skipped where CUDA is unavailable (tests/conftest.py)."""

from __future__ import annotations

import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import make_tiny_kl, smooth_image

pytestmark = pytest.mark.gpu


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, f"{name}{{{wanted}}} missing from the metrics"
    return float(found.group(1))


def test_concurrent_requests_on_cuda_are_pipelined_and_reported(tmp_path):
    from latentd.client import LatentClient
    from latentd.vae import save_model

    from tests.integration.conftest import ServerFactory

    with ServerFactory({"tiny": str(save_model(make_tiny_kl(), tmp_path / "tiny"))}) as factory:
        harness = factory(device="cuda", max_batch_size=4, metrics_port=0)  # overlap auto: on for CUDA
        device = str(harness.codec().placement.device)
        workers = {t.name for t in threading.enumerate() if t.name.startswith("batcher-tiny")}
        assert workers == {"batcher-tiny-0", "batcher-tiny-1"}
        images = [smooth_image(64, 64, seed=seed) for seed in range(16)]
        with LatentClient(harness.address, timeout=120) as client, ThreadPoolExecutor(8) as pool:
            latents = list(pool.map(lambda image: client.encode(image, dtype="float32"), images))
            decoded = list(pool.map(lambda z: client.decode(z, sizes=(64, 64)), latents))
        codec = harness.codec()
        for image, served, out in zip(images, latents, decoded):
            np.testing.assert_allclose(served, codec.encode(image).float().numpy(), rtol=2e-2, atol=2e-2)
            assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        url = f"http://127.0.0.1:{harness.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert _metric(text, "latentd_compute_busy_seconds_total", model="tiny", device=device) > 0
        assert 0 < _metric(text, "latentd_compute_busy_fraction", model="tiny", device=device) <= 1
        peak = _metric(text, "latentd_model_memory_peak_bytes", model="tiny", device=device)
        weights = _metric(text, "latentd_model_weights_bytes", model="tiny", device=device)
        assert peak >= weights > 0
        assert 0 < _metric(text, "latentd_device_memory_used_bytes", device=device) <= _metric(
            text, "latentd_device_memory_total_bytes", device=device)
        assert _metric(text, "latentd_device_memory_peak_bytes", device=device) >= peak
        assert _metric(text, "latentd_device_memory_free_bytes", device=device) > 0

"""The two codec backends of the CLI and tools: both are `Backend`s and give the same shapes and kinds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from latentd.client.cli.backends import Backend, LocalBackend, RemoteBackend
from tests.conftest import smooth_image


def test_the_local_backend_is_a_backend_and_its_roundtrip_matches_encode_then_decode(tiny_codec):
    backend = LocalBackend(tiny_codec)
    assert isinstance(backend, Backend)
    image = smooth_image(20, 28, seed=1)
    latents = backend.encode([image])
    assert latents[0].dtype == np.float32 and latents[0].shape == (4, 10, 14)
    decoded = backend.decode(latents, [(20, 28)])[0]
    values, reconstruction, encode_s, decode_s = backend.roundtrip(image, "float32", "auto")
    assert values == latents[0].size and encode_s >= 0 and decode_s >= 0
    assert np.array_equal(reconstruction, decoded)


def test_the_remote_backend_takes_what_it_knows_from_the_server():
    info = SimpleNamespace(name="m", max_pixels=1 << 20, downsampling_factor=8, scaling_factor=0.5,
                           shift_factor=None, codebook_size=16384, codebook_dim=4, latents_mean=(0.5,) * 4,
                           latents_std=(2.0,) * 4)
    client = SimpleNamespace(model=lambda name: info, target="127.0.0.1:1")
    backend = RemoteBackend(client, None)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.where, backend.factor) == ("m", "server 127.0.0.1:1", 8)
    # a VQ model's codebook size and dimension come from the server; its codebook itself does not
    assert (backend.codebook_size, backend.codebook_dim, backend.codebook) == (16384, 4, None)
    assert (backend.latents_mean, backend.latents_std) == ((0.5,) * 4, (2.0,) * 4)
    assert not isinstance(object(), Backend)


def test_both_backends_give_the_raw_posterior(tiny_codec):
    image = smooth_image(20, 28, seed=1)
    (mean, logvar), = LocalBackend(tiny_codec).posterior([image])
    assert mean.shape == logvar.shape == (4, 10, 14) and mean.dtype == np.float32
    np.testing.assert_allclose(tiny_codec.scale(torch.from_numpy(mean)).numpy(),
                               LocalBackend(tiny_codec).encode([image])[0], atol=1e-5)
    info = SimpleNamespace(name="m", max_pixels=1 << 20, downsampling_factor=8, scaling_factor=0.5, shift_factor=None,
                           codebook_size=0, codebook_dim=0, latents_mean=(), latents_std=())
    calls = []
    client = SimpleNamespace(model=lambda name: info, target="t",
                             posterior=lambda images, **kw: calls.append(kw) or ([mean], [logvar]))
    (got_mean, got_logvar), = RemoteBackend(client, None).posterior([image])
    assert got_mean is mean and got_logvar is logvar and calls == [{"model": "m", "dtype": "float32", "tiling": "auto"}]

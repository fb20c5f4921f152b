"""A batch's stages: what `prepare` hands the model on a GPU is what the codec computes the same from."""

from __future__ import annotations

import types

import numpy as np
import torch

from latentd.server.jobs import ENCODE, BatchKey, Job, compute, finish, prepare, predict
from tests.conftest import smooth_image

KEY = BatchKey(ENCODE, 24, 40, "auto", kind=True)


def test_on_a_gpu_images_are_prepared_as_contiguous_uint8_chw_tensors():
    gpu_codec = types.SimpleNamespace(placement=types.SimpleNamespace(device=torch.device("cuda", 0)))
    image = smooth_image(24, 40, seed=3)
    (prepared,) = prepare(gpu_codec, KEY, [Job(image)])
    assert prepared.data.dtype == torch.uint8 and tuple(prepared.data.shape) == (3, 24, 40)
    assert prepared.data.is_contiguous()
    assert torch.equal(prepared.data, torch.from_numpy(image).permute(2, 0, 1))


def test_a_gpu_prepared_image_encodes_bit_for_bit_as_the_array():
    from latentd.vae import Codec
    from tests.conftest import make_tiny_kl

    codec = Codec(make_tiny_kl(), name="tiny")
    images = [smooth_image(24, 40, seed=seed) for seed in range(2)]
    expected = predict(codec, KEY, [Job(image) for image in images])  # on the CPU: arrays as they are
    gpu_view = types.SimpleNamespace(placement=types.SimpleNamespace(device=torch.device("cuda", 0)))
    batch = prepare(gpu_view, KEY, [Job(image) for image in images])
    outputs = compute(codec, KEY, batch)
    for (mean, logvar), (expected_mean, expected_logvar) in zip(finish(codec, KEY, [b.job for b in batch], outputs),
                                                                 expected):
        assert torch.equal(mean, expected_mean) and torch.equal(logvar, expected_logvar)


def test_finish_fails_only_the_job_whose_conversion_raises():
    def broken(codec, output):
        raise ValueError("cannot convert")
    jobs = [Job(np.zeros(1)), Job(np.zeros(1), finish=broken), Job(np.zeros(1), finish=lambda codec, out: out * 2)]
    results = finish(None, KEY, jobs, [1, 2, 3])
    assert results[0] == 1 and isinstance(results[1], ValueError) and results[2] == 6

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


def test_on_a_gpu_a_batch_of_8_bit_answers_is_decoded_to_uint8_on_the_device():
    """A decode batch asks the codec for uint8 images (rounded where the model ran) only on a GPU and only
    when every answer is 8-bit; the finish passes them through as the array its message needs."""
    from latentd.server import wire
    from latentd.server.jobs import DECODE, DecodeFinish, Prepared
    from latentd.v1 import latentd_pb2 as pb
    from latentd.vae import Codec
    from tests.conftest import make_tiny_kl

    codec = Codec(make_tiny_kl(), name="tiny")
    latents = codec.encode(smooth_image(16, 24, seed=1))
    item = wire.DecodeItem(latents=codec.unscale(latents), size=(16, 24), scaled=False)
    png, raw_float = (DecodeFinish(wire.OutputFormat(fmt, 0)) for fmt in (pb.PNG, pb.RAW_FLOAT))
    key = BatchKey(DECODE, *latents.shape[1:], "auto", kind=latents.shape[0])
    asked = []

    class Spy:  # the codec's decode, seen as on a GPU
        placement = types.SimpleNamespace(device=torch.device("cuda", 0))

        def decode(self, *args, output, **kwargs):
            asked.append(output)
            return codec.decode(*args, output=output, **kwargs)

    for finishes, want in (([png, png], "numpy"), ([png, raw_float], "tensor")):
        jobs = [Job(item, finish) for finish in finishes]
        results = finish(codec, key, jobs, compute(Spy(), key, [Prepared(job, item.latents) for job in jobs]))
        assert asked.pop() == want
        reference = codec.decode(latents, sizes=(16, 24))  # uint8 [H, W, 3], the CPU's rounding
        assert results[0].dtype == np.uint8 and np.array_equal(results[0], reference)
    cpu_jobs = [Job(item, png)]
    spy_cpu = types.SimpleNamespace(placement=types.SimpleNamespace(device=torch.device("cpu")),
                                    decode=lambda *a, output, **k: asked.append(output) or codec.decode(*a, output=output, **k))
    compute(spy_cpu, key, [Prepared(job, item.latents) for job in cpu_jobs])
    assert asked.pop() == "tensor"

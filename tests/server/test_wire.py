"""The wire's request checks: each refusal names the field at fault."""

from __future__ import annotations

import re

import pytest

from latentd.server import wire
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.errors import InvalidInputError


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"count": 0, "height": 8, "width": 8}, "count"),
    ({"count": wire.MAX_PRIOR_SAMPLES + 1, "height": 8, "width": 8}, "count"),
    ({"count": 1, "height": 0, "width": 8}, "height"),
    ({"count": 1, "height": 8, "width": -1}, "width"),
    ({"count": 1, "height": 4096, "width": 4096}, "height"),
])
def test_prior_sample_refuses_counts_and_sizes_out_of_range(request_fields, field):
    with pytest.raises(InvalidInputError) as raised:
        wire.prior_sample(pb.SamplePriorRequest(**request_fields), max_pixels=1024 * 1024)
    assert raised.value.field == field


def test_prior_sample_accepts_the_limits():
    wire.prior_sample(pb.SamplePriorRequest(count=wire.MAX_PRIOR_SAMPLES, height=1024, width=1024), 1024 * 1024)


def test_nonempty_names_the_empty_field():
    wire.nonempty([pb.Image()], "images")
    with pytest.raises(InvalidInputError) as raised:
        wire.nonempty([], "items")
    assert raised.value.field == "items" and "items is empty" in str(raised.value)


@pytest.mark.parametrize("options, message", [
    (pb.EncodeOptions(refine_steps=201), "options.refine_steps must be 0-200, got 201"),
    (pb.EncodeOptions(refine_steps=2**32 - 1), "options.refine_steps must be 0-200"),
    (pb.EncodeOptions(refine_steps=3, sample=True), "options.refine_steps: refinement improves the posterior mean"),
])
def test_refine_steps_out_of_range_or_with_sample_are_refused_naming_the_field(options, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)) as raised:
        wire.refine_steps(options)
    assert raised.value.field == "options.refine_steps"
    assert wire.refine_steps(pb.EncodeOptions(refine_steps=200)) == 200


# ---- VQ codebook indices ----------------------------------------------------------------------

def _vq_info(**changes):
    from latentd.v1.results import ModelInfo

    values = dict(name="vq", model_class="VQModel", latent_channels=3, downsampling_factor=2, scaling_factor=1.0,
                  shift_factor=0.0, dtype="float32", parameters=1, has_posterior=False, codebook_size=8,
                  codebook_dim=3)
    return ModelInfo(**{**values, **changes})


def _indices(array, **fields):
    from latentd.v1.tensors import to_tensor

    return pb.Latents(latents=to_tensor(array, "int32"), **fields)


def test_indices_decode_to_their_codebook_vectors():
    import numpy as np
    import torch

    codebook = torch.arange(24.0).reshape(8, 3)
    item = wire.read_latents(_indices(np.array([[7, 0], [1, 2]]), height=3), "items[0]", _vq_info(), 1 << 20,
                             codebook=codebook)
    assert item.latents.shape == (3, 2, 2) and item.latents[:, 0, 0].tolist() == [21.0, 22.0, 23.0]
    assert item.size == (3, 4) and not item.scaled


@pytest.mark.parametrize(("array", "fields", "info", "field", "words"), [
    ([[0, 8]], {}, {}, "items[0].latents", "index 8, outside the codebook [0, 8)"),
    ([[-1, 0]], {}, {}, "items[0].latents", "index -1"),
    ([0, 1, 2], {}, {}, "items[0].latents.shape", "must be [h, w]"),
    ([[[0]]], {}, {}, "items[0].latents.shape", "must be [h, w]"),
    ([[0, 1]], {"height": 3}, {}, "items[0].height", "must be 1-2"),
    ([[0, 1]], {}, {"codebook_size": 0, "codebook_dim": 0, "model_class": "AutoencoderKL"},
     "items[0].latents.dtype", "has no codebook"),
])
def test_bad_indices_name_the_field(array, fields, info, field, words):
    import numpy as np
    import torch

    with pytest.raises(InvalidInputError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) \
            as raised:
        wire.read_latents(_indices(np.array(array), **fields), "items[0]", _vq_info(**info), 1 << 20,
                          codebook=torch.zeros(8, 3))
    assert raised.value.field == field


def test_packed_indices_are_refused():
    import numpy as np
    import torch

    with pytest.raises(InvalidInputError) as raised:
        wire.read_latents(_indices(np.zeros((2, 2)), height=4, width=4), "items[0]", _vq_info(), 1 << 20,
                          packed=True, codebook=torch.zeros(8, 3))
    assert raised.value.field == "options.packed"


@pytest.mark.parametrize(("options", "info", "field"), [
    ({}, {"codebook_size": 0}, "options.indices"),
    ({"raw": True}, {}, "options.raw"),
    ({"packed": True}, {}, "options.packed"),
    ({"posterior": True}, {}, "options.posterior"),
    ({"latent_dtype": pb.FLOAT16}, {}, "options.latent_dtype"),
    ({"refine_steps": 2}, {}, "options.refine_steps"),
])
def test_index_requests_refuse_latent_only_options(options, info, field):
    wire.index_options(pb.EncodeOptions(indices=True), _vq_info())
    with pytest.raises(InvalidInputError) as raised:
        wire.index_options(pb.EncodeOptions(indices=True, **options), _vq_info(**info))
    assert raised.value.field == field


def test_float_latents_for_a_vq_model_are_still_latents_and_int32_is_no_latent_dtype():
    import numpy as np
    from latentd.v1.tensors import to_tensor

    item = wire.read_latents(pb.Latents(latents=to_tensor(np.zeros((3, 2, 2), np.float32))), "items[0]", _vq_info(),
                             1 << 20)
    assert item.latents.shape == (3, 2, 2) and item.scaled
    with pytest.raises(InvalidInputError) as raised:
        wire.latent_dtype(pb.INT32, "options.latent_dtype")
    assert raised.value.field == "options.latent_dtype"
    for dtype, shape, words in (("float32", (2, 2), "must be INT32 for codebook indices"), ("uint8", (2, 2), "or INT32")):
        message = pb.Latents(latents=to_tensor(np.zeros(shape, dtype)))
        with pytest.raises(InvalidInputError, match=words) as raised:
            wire.read_latents(message, "items[0]", _vq_info(), 1 << 20)
        assert raised.value.field == "items[0].latents.dtype"

"""Encode-time refinement: latents optimised against the frozen decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.vae.codec import Codec, CodecOptions
from latentd.vae.errors import InvalidInputError
from latentd.vae.metrics import mse
from latentd.vae.refine import MAX_REFINE_STEPS, refine_latent
from latentd.vae.stopping import stoppable
from tests.conftest import make_tiny_kl, smooth_image


def _error(codec: Codec, image: np.ndarray, refine: int) -> float:
    latents = codec.encode(image, refine=refine)
    return mse(codec.decode(latents, sizes=image.shape[:2]), image)


def test_refinement_lowers_the_reconstruction_error_and_leaves_the_decoder_alone():
    codec = Codec(make_tiny_kl(), name="tiny")
    image = smooth_image(40, 48)
    weights = {name: p.clone() for name, p in codec.model.state_dict().items()}
    plain, refined = _error(codec, image, 0), _error(codec, image, 10)
    assert refined < plain * 0.9
    assert all(torch.equal(weights[name], p) for name, p in codec.model.state_dict().items())
    assert not any(p.requires_grad for p in codec.model.parameters())


def test_refinement_never_ends_worse_than_it_began():
    def decode(z):  # a decoder whose error the first step makes worse
        return z.repeat(1, 1, 1, 1) * 0 + z.mean() * 100

    start = torch.zeros(3, 4, 4)
    best = refine_latent(decode, torch.zeros(3, 4, 4), start, steps=3, lr=1.0)
    assert torch.equal(best, start)


@pytest.mark.parametrize("kwargs", [dict(refine=-1), dict(refine=MAX_REFINE_STEPS + 1), dict(refine=2, sample=True),
                                    dict(refine=2, tiling="on")])
def test_refine_refuses_what_it_cannot_do(kwargs):
    codec = Codec(make_tiny_kl(), name="tiny", options=CodecOptions(tile_size=32, tile_overlap=8))
    with pytest.raises(InvalidInputError) as raised:
        codec.encode(smooth_image(40, 48), **kwargs)
    assert raised.value.field == "refine"


def test_refinement_stops_when_its_caller_says_so():
    codec = Codec(make_tiny_kl(), name="tiny")
    steps = []

    def check():
        steps.append(1)
        if len(steps) > 3:
            raise TimeoutError("deadline")

    with pytest.raises(TimeoutError), stoppable(check):
        codec.encode(smooth_image(40, 48), refine=50)
    assert len(steps) == 4


def test_the_command_line_checks_the_same_bound():
    """The CLI checks --refine before loading torch, so it keeps its own copy of the bound."""
    from latentd.client.cli.common import MAX_REFINE_STEPS as CLI_MAX_REFINE_STEPS

    assert CLI_MAX_REFINE_STEPS == MAX_REFINE_STEPS

"""VQ models in the library: loading a VQModel folder, codebook indices out of encode and into decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.vae import Codec, InvalidInputError, load_codec, save_model
from latentd.vae.codes import lookup, nearest
from tests.conftest import make_tiny_kl, make_tiny_vq, smooth_image
from tests.vae.codec_contract import CodecContract


class TestVQCodec(CodecContract):
    """Everything any codec does, with a VQModel (its float latents are the pre-quantisation ones)."""

    tiling_psnr_floor = 15.0

    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_vq(), name="tiny-vq", **kwargs)


@pytest.fixture(scope="module")
def vq_codec():
    return Codec(make_tiny_vq(), name="vq")


def test_a_vq_model_folder_loads_and_reports_its_codebook(tmp_path):
    folder = save_model(make_tiny_vq(), tmp_path / "vq")
    codec = load_codec(folder)
    info = codec.info
    assert info.model_class == "VQModel" and not info.has_posterior
    assert (info.codebook_size, info.codebook_dim, info.latent_channels, info.downsampling_factor) == (64, 3, 3, 2)
    assert info.to_dict()["codebook_size"] == 64
    assert Codec(make_tiny_kl()).info.codebook_size == 0


def test_indices_are_the_nearest_codes_of_the_latents_and_decode_alike(vq_codec):
    image = smooth_image(30, 40)
    latents = vq_codec.encode(image, scaled=False)
    indices = vq_codec.encode(image, indices=True)
    assert indices.shape == (15, 20) and indices.dtype == torch.int64
    codebook = vq_codec.model.quantize.embedding.weight.detach().float()
    assert torch.equal(indices, nearest(latents, codebook))
    assert len(indices.unique()) > 1
    from_latents = vq_codec.decode(latents, scaled=False, sizes=(30, 40))
    from_indices = vq_codec.decode(indices, sizes=(30, 40))
    assert from_indices.shape == (30, 40, 3)
    np.testing.assert_array_equal(from_latents, from_indices)
    np.testing.assert_array_equal(vq_codec.decode(indices.numpy().astype(np.int32), sizes=(30, 40)), from_indices)


def test_indices_follow_the_callers_form(vq_codec):
    images = [smooth_image(16, 16, seed=1), smooth_image(16, 24, seed=2)]
    codes = vq_codec.encode(images, indices=True)
    assert isinstance(codes, list) and [tuple(c.shape) for c in codes] == [(8, 8), (8, 12)]
    decoded = vq_codec.decode(codes)
    assert [d.shape for d in decoded] == [(16, 16, 3), (16, 24, 3)]
    batch = vq_codec.encode(np.stack([images[0], images[0]]), indices=True)
    assert batch.shape == (2, 8, 8)
    assert vq_codec.decode(batch).shape == (2, 16, 16, 3)


def test_lookup_is_the_codebook_rows():
    codebook = torch.arange(12.0).reshape(4, 3)
    latent = lookup(torch.tensor([[3, 0]]), codebook)
    assert latent.shape == (3, 1, 2) and latent[:, 0, 0].tolist() == [9.0, 10.0, 11.0]
    assert torch.equal(nearest(latent, codebook), torch.tensor([[3, 0]]))


@pytest.mark.parametrize("indices, match", [
    (torch.full((4, 4), 64), "index 64 is outside the codebook"),
    (torch.full((4, 4), -1), "index -1 is outside the codebook"),
    (torch.zeros(4, dtype=torch.long), "expected 2-D or 3-D indices"),
    (torch.zeros(1, 1, 4, 4, dtype=torch.long), "expected 2-D or 3-D indices"),
    (torch.zeros(0, 4, dtype=torch.long), "empty spatial size"),
    ([torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2)], r"latents\[1\]: codebook indices must be integers"),
])
def test_bad_indices_are_refused_naming_the_problem(vq_codec, indices, match):
    with pytest.raises(InvalidInputError, match=match) as raised:
        vq_codec.decode(indices)
    assert raised.value.field == "latents"


def test_indices_need_a_vq_model_and_exclude_other_options(vq_codec, image):
    kl = Codec(make_tiny_kl())
    with pytest.raises(InvalidInputError, match="no codebook") as raised:
        kl.encode(image, indices=True)
    assert raised.value.field == "indices"
    with pytest.raises(InvalidInputError, match="floating point"):  # to a KL model, integers are bad latents
        kl.decode(np.zeros((4, 4, 4), np.int64))
    for option in ("packed", "refine"):
        with pytest.raises(InvalidInputError, match=f"indices do not combine with {option}"):
            vq_codec.encode(image, indices=True, **{option: 1 if option == "refine" else True})
    with pytest.raises(InvalidInputError, match="packed"):
        vq_codec.decode(torch.zeros(4, 4, dtype=torch.long), packed=True, sizes=(8, 8))

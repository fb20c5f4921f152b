"""A shared contract every codec model class must meet (diffusers-style tester mixin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.vae import Codec, InvalidInputError
from tests.conftest import smooth_image


class CodecContract:
    """Subclasses provide `make_codec()`; every test here runs for each model class."""

    # Lowest PSNR (dB) of tiled against untiled output. Without GroupNorm (AutoencoderTiny) tiling
    # is exact up to float rounding; with it, each tile normalises with its own statistics, which
    # a random-weight model magnifies, so the bound only catches misplaced or mis-weighted tiles.
    tiling_psnr_floor = 50.0

    def make_codec(self, **kwargs) -> Codec:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def test_shapes_and_dtypes(self):
        codec = self.make_codec()
        f, c = codec.factor, codec.info.latent_channels
        image = smooth_image(8 * f, 12 * f)
        latents = codec.encode(image)
        assert latents.shape == (c, 8, 12) and latents.dtype == torch.float32
        decoded = codec.decode(latents)
        assert decoded.shape == (8 * f, 12 * f, 3) and decoded.dtype == np.uint8

    def test_forms_follow_the_input(self):
        codec = self.make_codec()
        image = smooth_image(16, 16)
        assert codec.encode(image).dim() == 3
        assert codec.encode(np.stack([image, image])).dim() == 4
        listed = codec.encode([image, image])
        assert isinstance(listed, list) and len(listed) == 2
        assert isinstance(codec.decode(listed[0], output="pil"), Image.Image)
        assert codec.decode(torch.stack(listed)).shape[0] == 2
        assert codec.decode(torch.stack(listed), output="tensor").shape == (2, 3, 16, 16)

    def test_same_input_same_output(self):
        codec = self.make_codec()
        image = smooth_image(24, 40)
        assert torch.equal(codec.encode(image), codec.encode(image))
        latents = codec.encode(image)
        assert np.array_equal(codec.decode(latents), codec.decode(latents))

    def test_batch_neighbours_do_not_change_a_result(self):
        codec = self.make_codec()
        a, b = smooth_image(32, 32, seed=1), smooth_image(32, 32, seed=2)
        alone = codec.encode(a)
        batched = codec.encode([b, a, b])[1]
        torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)

    def test_any_size_pads_and_crops_back(self):
        codec = self.make_codec()
        for height, width in [(1, 1), (3, 5), (17, 9), (33, 31)]:
            image = smooth_image(height, width)
            out = codec.roundtrip(image)
            assert out.shape == (height, width, 3)
            latents = codec.encode(image)
            f = codec.factor
            assert latents.shape[-2:] == (-(-height // f), -(-width // f))
            assert codec.decode(latents, sizes=(height, width)).shape == (height, width, 3)

    def test_mixed_sizes_keep_order(self):
        codec = self.make_codec()
        images = [smooth_image(16, 24, seed=1), smooth_image(24, 16, seed=2), smooth_image(16, 24, seed=3)]
        together = codec.encode(images)
        for image, latent in zip(images, together):
            torch.testing.assert_close(codec.encode(image), latent, rtol=1e-5, atol=1e-5)
        restored = codec.roundtrip(images)
        assert [r.shape for r in restored] == [i.shape for i in images]

    def test_scaled_and_raw_latents(self):
        codec = self.make_codec()
        image = smooth_image(16, 16)
        raw = codec.encode(image, scaled=False)
        scaled = codec.encode(image)
        info = codec.info
        if info.latents_mean:  # per-channel statistics (SDXL-style configs, FLUX.2's BatchNorm)
            mean = torch.tensor(info.latents_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(info.latents_std, dtype=torch.float32).view(-1, 1, 1)
            torch.testing.assert_close(scaled, (raw - mean) * info.scaling_factor / std)
        else:
            torch.testing.assert_close(scaled, (raw - info.shift_factor) * info.scaling_factor)
        np.testing.assert_array_equal(codec.decode(scaled), codec.decode(raw, scaled=False))

    def test_memory_bounded_batches_match_one_big_batch(self):
        image_count = 5
        images = np.stack([smooth_image(16, 16, seed=s) for s in range(image_count)])
        whole = self.make_codec().encode(images)
        # One image per forward pass.
        from latentd.vae import CodecOptions

        split = self.make_codec(options=CodecOptions(max_batch_pixels=16 * 16)).encode(images)
        torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)

    def test_bad_latents_name_the_field(self):
        codec = self.make_codec()
        c = codec.info.latent_channels
        for bad, words in [
            (torch.zeros(c + 1, 4, 4), "latent channels"),
            (torch.full((c, 4, 4), float("nan")), "NaN"),
            (torch.zeros(4, 4), "latents"),
            ([], "no latents"),
            (torch.zeros(c, 0, 4), "empty"),
            # Integers are codebook indices to a VQ model (tests/vae/test_vq_codec.py), bad latents to others.
            *([] if codec.info.codebook_size else [(np.zeros((c, 4, 4), np.int32), "floating point")]),
        ]:
            with pytest.raises(InvalidInputError, match=words) as caught:
                codec.decode(bad)
            assert caught.value.field == "latents"

    def test_bad_sizes_are_refused(self):
        codec = self.make_codec()
        latents = codec.encode(smooth_image(16, 16))
        with pytest.raises(InvalidInputError, match="does not fit"):
            codec.decode(latents, sizes=(17, 16))
        with pytest.raises(InvalidInputError, match="entries"):
            codec.decode([latents, latents], sizes=[(16, 16)] * 3)

    def test_tiled_matches_untiled(self):
        from latentd.vae import CodecOptions

        f = self.make_codec().factor
        codec = self.make_codec(options=CodecOptions(tile_size=16 * f, tile_overlap=8 * f, tile_threshold=10**6))
        image = smooth_image(40 * f, 36 * f)
        latents = codec.encode(image, tiling="off")
        tiled_latents = codec.encode(image, tiling="on")
        assert tiled_latents.shape == latents.shape
        from latentd.vae.metrics import psnr

        assert psnr(codec.decode(latents, tiling="on"), codec.decode(latents, tiling="off")) > self.tiling_psnr_floor
        assert psnr(codec.roundtrip(image, tiling="on"), codec.roundtrip(image, tiling="off")) > self.tiling_psnr_floor

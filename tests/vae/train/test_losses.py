"""The objective: closed-form KL, free bits, beta schedules, learning-rate schedule, optional terms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from latentd.vae import ModelLoadError
from latentd.vae.train.config import BetaConfig, LossConfig, OptimConfig
from latentd.vae.train.losses import (
    PatchDiscriminator,
    beta_at,
    generator_loss,
    hinge_d_loss,
    kl_per_channel,
    kl_per_element,
    kl_term,
    lr_at,
    schedule_lr,
    wsd_lr_at,
    ms_ssim_loss,
)


def test_kl_matches_the_closed_form_and_torch():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_element(mean, logvar), expected)
    torch.testing.assert_close(kl_term(mean, logvar), expected.sum(dim=(1, 2, 3)).mean())
    assert kl_per_element(torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_free_bits_floor_each_channel():
    mean = torch.zeros(2, 4, 3, 3)
    logvar = torch.zeros(2, 4, 3, 3)
    mean[:, 0] = 2.0  # channel 0 carries 2 nats per value; the others none
    per_channel = kl_per_channel(mean, logvar)
    assert per_channel.tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    floored = kl_term(mean, logvar, free_bits=0.5)
    assert floored.item() == pytest.approx((2.0 + 3 * 0.5) * 9)
    # Below the floor the KL gives no gradient, so nothing pushes a channel to collapse further.
    logvar.requires_grad_(True)
    kl_term(mean, logvar, free_bits=0.5).backward()
    assert logvar.grad[:, 1:].abs().sum() == 0


def test_beta_schedules():
    constant = BetaConfig(schedule="constant", value=0.1)
    linear = BetaConfig(schedule="linear", value=0.1, anneal_steps=100)
    cyclical = BetaConfig(schedule="cyclical", value=0.1, cycle_steps=100, cycle_ratio=0.5)
    assert beta_at(0, constant) == beta_at(10**6, constant) == 0.1
    assert [beta_at(s, linear) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    assert [beta_at(s, cyclical) for s in (0, 25, 50, 99, 100, 125)] == pytest.approx([0, 0.05, 0.1, 0.1, 0, 0.05])


def test_annealing_changes_the_loss_as_specified():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    config = LossConfig(beta=BetaConfig(schedule="linear", value=1.0, anneal_steps=10))
    start = generator_loss(x, x, mean, logvar, step=0, config=config)
    half = generator_loss(x, x, mean, logvar, step=5, config=config)
    assert start.total.item() == pytest.approx(0.0, abs=1e-7)
    assert half.total.item() == pytest.approx(0.5 * kl_term(mean, logvar).item() / x[0].numel())


def test_learning_rate_warmup_and_cosine():
    rates = [lr_at(s, 1.0, 10, 110, 0.1) for s in (0, 9, 10, 60, 110, 500)]
    assert rates == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1, 0.1])


def test_wsd_is_constant_then_decays_over_its_last_part():
    rates = [wsd_lr_at(s, 1.0, 100, 0.1, 0.2) for s in (0, 50, 79, 80, 90, 100, 500)]
    assert rates == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    # Raising max_steps during the constant part changes nothing already trained.
    assert [wsd_lr_at(s, 1.0, 1000, 0.1, 0.2) for s in range(80)] == [wsd_lr_at(s, 1.0, 100, 0.1, 0.2)
                                                                      for s in range(80)]


def test_schedule_warms_up_again_from_where_the_optimizer_started():
    optim = OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, max_steps=1000, decay_ratio=0.2, min_lr_ratio=0.1)
    assert schedule_lr(0, optim) == pytest.approx(0.1)
    assert schedule_lr(500, optim) == pytest.approx(1.0)
    # Continued at step 500 with fresh moments: the warm-up runs again from there.
    assert [schedule_lr(s, optim, fresh_from=500) for s in (500, 504, 509, 600)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert schedule_lr(900, optim, fresh_from=896) == pytest.approx(0.5 * wsd_lr_at(900, 1.0, 1000, 0.1, 0.2))
    cosine = OptimConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert schedule_lr(60, cosine) == pytest.approx(lr_at(60, 1.0, 10, 110, 0.1))
    assert schedule_lr(60, cosine, fresh_from=55) == pytest.approx(0.6 * lr_at(60, 1.0, 0, 110, 0.1))


def test_ms_ssim_term_works_on_small_crops():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ms_ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    assert ms_ssim_loss(x, -x).item() > 0.5
    big = torch.rand(1, 3, 128, 128) * 2 - 1
    assert 0 < ms_ssim_loss(big, big * 0.5).item() < 1


def test_discriminator_and_adaptive_weight():
    from tests.vae.train.conftest import TINY_ARCHITECTURE
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_ARCHITECTURE)
    disc = PatchDiscriminator(layers=2, channels=8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    config = LossConfig()
    config.discriminator.enabled, config.discriminator.start_step = True, 5
    before = generator_loss(x, reconstruction, posterior.mean, posterior.logvar, step=4, config=config,
                            discriminator=disc, last_layer=vae.decoder.conv_out.weight)
    after = generator_loss(x, reconstruction, posterior.mean, posterior.logvar, step=5, config=config,
                           discriminator=disc, last_layer=vae.decoder.conv_out.weight)
    assert before.gan is None and after.gan is not None and after.gan_weight.item() > 0
    assert hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == 0.0
    assert disc(x).shape[0] == 2


def test_lpips_without_weights_fails_clearly(tmp_path):
    from latentd.vae.train.lpips import LPIPS

    with pytest.raises(ModelLoadError, match="cannot be downloaded"):
        LPIPS.from_file(tmp_path / "missing.safetensors")


def test_lpips_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    from latentd.vae.train.lpips import LPIPS

    torch.manual_seed(0)
    path = tmp_path / "lpips.safetensors"
    weights = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    save_file(weights, str(path))
    lpips = LPIPS.from_file(path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max().item() == pytest.approx(0.0, abs=1e-6)
    assert (lpips(x, y) > 0).all() and not math.isnan(lpips(x, y).sum().item())
    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        LPIPS.from_file(tmp_path / "wrong.safetensors")

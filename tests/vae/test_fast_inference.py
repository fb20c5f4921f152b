"""The exact inference rewrites: same results, same parameters, training untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentd.vae.fast_inference import FastResnetBlock2D, FastUpsample2D, optimize_for_inference, polyphase_kernel
from tests.conftest import make_tiny_kl


def test_polyphase_kernel_equals_upsample_then_convolve():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9)
    weight, bias = torch.randn(6, 5, 3, 3), torch.randn(6)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    kernel, phase_bias = polyphase_kernel(weight, bias)
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, phase_bias).view(2, 2, 2, 6, 8, 10)
    got = torch.empty_like(expected).view(2, 6, 7, 2, 9, 2)
    for a in (0, 1):
        for b in (0, 1):
            got[:, :, :, a, :, b] = phases[:, a, b, :, a : a + 7, b : b + 9]
    torch.testing.assert_close(got.view_as(expected), expected, rtol=1e-4, atol=1e-5)


def test_optimized_model_matches_and_keeps_its_parameters():
    plain, fast = make_tiny_kl(), make_tiny_kl()
    keys = list(fast.state_dict())
    assert optimize_for_inference(fast) > 0
    assert list(fast.state_dict()) == keys
    assert any(isinstance(m, FastUpsample2D) for m in fast.modules())
    assert any(isinstance(m, FastResnetBlock2D) for m in fast.modules())
    x = torch.rand(2, 3, 20, 28) * 2 - 1
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.inference_mode():
            expected = plain.decode(plain.encode(x).latent_dist.mode()).sample
            got = fast.to(memory_format=layout).decode(fast.encode(x.contiguous(memory_format=layout))
                                                       .latent_dist.mode()).sample
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_uses_the_original_code_path():
    plain, fast = make_tiny_kl(), make_tiny_kl()
    optimize_for_inference(fast)
    fast.train()
    x = torch.rand(1, 3, 16, 16)
    losses = [model.decode(model.encode(x).latent_dist.mode()).sample.square().mean() for model in (plain, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_kernel_cache_follows_weight_updates():
    model = make_tiny_kl()
    optimize_for_inference(model)
    upsampler = next(m for m in model.modules() if isinstance(m, FastUpsample2D))
    x = torch.randn(1, upsampler.channels, 4, 4)
    with torch.inference_mode():
        before = upsampler(x)
    with torch.no_grad():
        upsampler.conv.weight.mul_(2)
    with torch.inference_mode():
        after = upsampler(x)
        expected = upsampler.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)

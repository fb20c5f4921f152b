"""A VQModel started from a trained AutoencoderKL of the same layout: its pre-quantisation latents are the
KL model's posterior means, and its decoder is the KL decoder, so VQ training only has to learn the codebook
and adapt around it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError


def vq_from_kl(kl: nn.Module, architecture: dict[str, Any]) -> nn.Module:
    """A VQModel(**architecture) whose encoder computes `kl`'s posterior mean and whose decoder is `kl`'s.

    The KL encoder ends in conv_out (2C moments) then quant_conv (1x1); the mean's rows of quant_conv are
    folded into conv_out, which is linear after it, and the VQModel's quant_conv becomes the identity.
    """
    from diffusers import VQModel

    vq = VQModel(**architecture)
    channels = kl.config.latent_channels
    if vq.config.latent_channels != channels or vq.quantize.embedding.embedding_dim != channels:
        raise InvalidInputError(f"model.init_from: a KL model with {channels} latent channels starts a VQModel with "
                                f"latent_channels and vq_embed_dim {channels}", field="model.init_from")
    try:
        vq.decoder.load_state_dict(kl.decoder.state_dict(), strict=True)
        body = {key: value for key, value in kl.encoder.state_dict().items() if not key.startswith("conv_out.")}
        missing, unexpected = vq.encoder.load_state_dict(body, strict=False)
    except RuntimeError as exc:
        raise InvalidInputError(f"model.init_from: the KL model's layout differs from model.architecture: {exc}",
                                field="model.init_from") from exc
    if unexpected or set(missing) != {"conv_out.weight", "conv_out.bias"}:
        raise InvalidInputError(f"model.init_from: the KL encoder does not fit model.architecture (missing "
                                f"{sorted(missing)}, unexpected {sorted(unexpected)})", field="model.init_from")
    with torch.no_grad():
        moments = 2 * channels
        if kl.quant_conv is not None:
            mix, shift = kl.quant_conv.weight[:channels, :, 0, 0], kl.quant_conv.bias[:channels]
        else:
            mix, shift = torch.eye(moments)[:channels], torch.zeros(channels)
        out = kl.encoder.conv_out
        vq.encoder.conv_out.weight.copy_(torch.einsum("om,mchw->ochw", mix, out.weight))
        vq.encoder.conv_out.bias.copy_(mix @ out.bias + shift)
        vq.quant_conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        vq.quant_conv.bias.zero_()
        if kl.post_quant_conv is not None:
            vq.post_quant_conv.load_state_dict(kl.post_quant_conv.state_dict())
        else:
            vq.post_quant_conv.weight.copy_(torch.eye(channels)[:, :, None, None])
            vq.post_quant_conv.bias.zero_()
    return vq

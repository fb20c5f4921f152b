"""Test helper: write a diffusers AutoencoderKL state dict in the original LDM/SD key layout."""

from __future__ import annotations

import re

import torch

_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _ldm_key(key: str, num_up_blocks: int) -> str:
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for new, old in _ATTENTION.items():
            key = key.replace(f"attn_1.{new}", f"attn_1.{old}")
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def to_ldm_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    num_up_blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    converted = {}
    for key, value in state.items():
        ldm = _ldm_key(key, num_up_blocks)
        if ".attn_1." in ldm and ldm.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        converted[prefix + ldm] = value.clone().contiguous()
    return converted

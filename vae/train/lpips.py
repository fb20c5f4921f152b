"""LPIPS (Zhang et al. 2018, VGG16 variant) built from a local safetensors file; nothing is downloaded.

The file holds torchvision's VGG16 feature weights under `features.{i}.weight|bias` and the LPIPS
linear heads under `lin{k}.model.1.weight` (the names of the `lpips` package's `vgg.pth`), so it is
the two published state dicts merged and saved with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

# VGG16 `features` layout: channel widths of the conv layers, "M" for max-pooling.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# Indices in `features` after which LPIPS taps the activations (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            width = int(item)
    return nn.Sequential(*layers)


class _Linear(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Perceptual distance per image between two batches in [-1, 1]; frozen, eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        for k, channels in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _Linear(channels))

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"LPIPS weights {path} not found: LPIPS needs a local safetensors file "
                                 "(VGG16 features + LPIPS linear heads); it cannot be downloaded here")
        model = cls()
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:
            raise ModelLoadError(f"LPIPS weights {path} do not fit: {' '.join(str(exc).split())[:300]}") from exc
        return model.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
            if index == _TAPS[-1]:
                break
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        taps_a = self._taps((a - self.shift) / self.scale)
        taps_b = self._taps((b - self.shift) / self.scale)
        distance = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for k, (fa, fb) in enumerate(zip(taps_a, taps_b)):
            fa = fa / (fa.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + getattr(self, f"lin{k}").model((fa - fb).square()).mean(dim=(1, 2, 3))
        return distance

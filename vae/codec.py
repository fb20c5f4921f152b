"""`Codec`: images to latents (or VQ codebook indices) and back with a diffusers AutoencoderKL, AutoencoderTiny,
AutoencoderDC, AutoencoderKLFlux2 or VQModel."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import secrets
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latentd.v1.results import AnomalyScore

from .codes import are_indices, indices_to_tensors, lookup, nearest
from .convert import (
    OutputKind,
    format_images,
    format_latents,
    images_to_tensors,
    latents_to_tensors,
    tensor_to_uint8,
)
from .device_io import denormalise, from_host, normalise, to_host
from .devices import Placement, configure_cuda, native_bf16, resolve_placement
from .errors import InvalidInputError, NumericalError
from .fast_inference import optimize_for_inference
from .latent_ops import (
    gaussian_like,
    interpolation_path,
    pack_latents,
    packed_latent_size,
    patchify,
    unpack_latents,
    unpatchify,
)
from .loading import load_model
from .metrics import mse, psnr
from .model_info import ModelInfo, describe_model, latent_shape
from .options import RECOMPUTED_TILE_WORK, TILING_MODES, CodecOptions, Tiling
from .pass_limits import PassLimits, activation_bytes_per_pixel, plan_passes
from .refine import check_refine_steps, refine_latent
from .stopping import checkpoint
from .tile_norms import share_tile_norms
from .tiling import tile_spans, tiled_map

logger = logging.getLogger(__name__)

class Codec:
    """Encode images to latents and decode latents to images, on CPU or GPU, deterministically.

    Example:
        >>> codec = load_codec("sd", random_seed=0)          # doctest: +SKIP
        >>> latents = codec.encode(pil_image)                 # [4, h/8, w/8], scaled  # doctest: +SKIP
        >>> image = codec.decode(latents, output="pil")       # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "model",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        options: CodecOptions | None = None,
    ):
        self.options = options or CodecOptions()
        self.placement: Placement = _safe_placement(resolve_placement(device, dtype), model, name)
        model = model.eval().requires_grad_(False)
        # Read before the cast below: FLUX.2's latent statistics are BatchNorm buffers, which a
        # half-precision copy would round.
        info = describe_model(model, name)
        self.options.validate(info.downsampling_factor)
        on_cuda = self.placement.device.type == "cuda"
        if on_cuda:
            configure_cuda(benchmark=self.options.cudnn_benchmark, tf32=self.options.tf32)
        # On CUDA pixels cross to and from the device as uint8 through pinned buffers, normalised and
        # rounded there (vae/device_io.py); the CPU keeps its float path.
        self._device_pixels = on_cuda
        # VQ models: the codebook in float32 on the CPU, where indices are chosen and looked up.
        self._codebook: torch.Tensor | None = (model.quantize.embedding.weight.detach().float().cpu().clone()
                                               if info.codebook_size else None)
        # The module rewrites are measured on CPUs only; GPUs run diffusers' modules as they are.
        if self.options.optimize and self.placement.device.type == "cpu":
            optimize_for_inference(model)
        share_tile_norms(model)
        # The float32 retry runs the weights as loaded, not an upcast of their rounded copy; it
        # stays on the CPU until a non-finite half-precision output first needs it.
        self._fp32_model: nn.Module | None = copy.deepcopy(model).float() if self.placement.low_precision else None
        self._fp32_ready = False
        # Set once a half-precision batch overflowed: the model's later batches go to float32 at once
        # instead of computing every batch twice.
        self._fp32_for_good = False
        # nn.Module.to rather than diffusers' override, which warns on every dtype cast (even with
        # no fp32-only modules); the VAEs handled here have none.
        self._model = nn.Module.to(model, device=self.placement.device, dtype=self.placement.dtype,
                                   memory_format=torch.channels_last)
        # Guards the float32 retry's one-time move only: model calls themselves run concurrently when
        # several threads call the codec (the server's compute lanes do; see server/compute.py).
        self._fp32_lock = threading.Lock()
        self.info: ModelInfo = dataclasses.replace(info, dtype=str(self.placement.dtype).removeprefix("torch."))
        self._statistics = _statistics(self.info)
        self.limits: PassLimits = self._pass_limits(model)
        if self.options.compile != "off":
            _compile(self._model, self.options.compile)

    def _pass_limits(self, model: nn.Module) -> PassLimits:
        """The options' fixed limits, or on CUDA (unless device_memory_fraction is 0) limits sized by the
        memory free on the device now that the weights are there."""
        opts = self.options
        fixed = PassLimits(max_batch_pixels=opts.max_batch_pixels, tile_size=opts.tile_size,
                           tile_threshold=opts.tile_threshold)
        if self.placement.device.type != "cuda" or not opts.device_memory_fraction:
            return fixed
        free, _ = torch.cuda.mem_get_info(self.placement.device)
        limits = plan_passes(free, activation_bytes_per_pixel(model, self.placement.dtype),
                             fraction=opts.device_memory_fraction, factor=self.factor, overlap=opts.tile_overlap)
        logger.info("%s: %d MiB free on %s: up to %d pixels per pass, tiles of %d px, %d per pass", self.info.name,
                    free >> 20, self.placement.device, limits.max_batch_pixels, limits.tile_size,
                    limits.tiles_per_pass)
        return limits

    @property
    def model(self) -> nn.Module:
        """The underlying diffusers model (in the codec's device and dtype)."""
        return self._model

    @property
    def factor(self) -> int:
        return self.info.downsampling_factor

    @property
    def codebook(self) -> torch.Tensor | None:
        """A VQ model's codebook [codebook_size, codebook_dim] (float32, CPU); None for other models."""
        return self._codebook

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """A raw latent [C, h, w] of a VQ model -> the index of its nearest codebook vector at each
        position, int64 [h, w] (what `encode(indices=True)` returns for that latent)."""
        if self._codebook is None:
            raise InvalidInputError(f"{self.info.model_class} {self.info.name!r} has no codebook", field="indices")
        return nearest(z, self._codebook)

    # ---- public API -------------------------------------------------------------------------

    def encode(
        self,
        images: Any,
        *,
        sample: bool = False,
        seed: int | None = None,
        scaled: bool = True,
        tiling: Tiling = "auto",
        packed: bool = False,
        refine: int = 0,
        indices: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Images -> latents (float32 CPU tensors [C, ceil(H/8), ceil(W/8)] in the caller's form).

        Latents are `(z - shift_factor) * scaling_factor` unless `scaled=False` (per-channel
        statistics where the model has them: docs/models.md). `z` is the
        posterior mean, or with `sample=True` a draw from the posterior seeded per image by
        `seed` (same seed, same latents; no seed: a fresh random one). `packed=True`: FLUX.1's
        packed layout [(h/2) * (w/2), C * 4] per image (sides multiples of twice the factor).
        `refine=N`: the mean then takes N optimisation steps against the decoder (`vae/refine.py`;
        each costs about three decodes; untiled images only, no sampling).
        VQ models: the latents are the quantiser's input; `indices=True` returns the codebook index of
        each position instead, int64 [ceil(H/8), ceil(W/8)] per image (`decode` takes either).
        """
        if indices:
            self._check_indices_request(sample=sample, packed=packed, refine=refine)
        items = self._images(images)
        if packed:
            for index, tensor in enumerate(items.tensors):
                height, width = tensor.shape[-2:]
                if height % (2 * self.factor) or width % (2 * self.factor):
                    raise InvalidInputError(f"packed latents need image sides that are multiples of {2 * self.factor} "
                                            f"(twice the model's factor); image {index} is {height}x{width}",
                                            field="packed")
        if sample and not self.info.has_posterior:
            raise InvalidInputError(f"{self.info.model_class} {self.info.name!r} is deterministic: it has no "
                                    "posterior to sample from", field="sample")
        if refine and sample:
            raise InvalidInputError("refine improves the posterior mean; it does not combine with sample",
                                    field="refine")
        if sample and seed is None:
            seed = secrets.randbits(63)
        posteriors = self._refined_posteriors(items.tensors, tiling, refine)
        if indices:
            return format_latents([self.nearest_indices(mean) for mean, _ in posteriors], items.form)
        latents = [self.latents_from_posterior(mean, logvar, sample=sample, seed=seed, index=index, scaled=scaled)
                   for index, (mean, logvar) in enumerate(posteriors)]
        return format_latents([pack_latents(z) for z in latents] if packed else latents, items.form)

    def _refined_posteriors(self, tensors: list[torch.Tensor], tiling: Tiling,
                            refine: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        check_refine_steps(refine)
        if refine and any(self.is_tiled(*t.shape[-2:], decode=False, tiling=tiling) for t in tensors):
            raise InvalidInputError("refine runs on untiled images only (tiling auto or off, and images that "
                                    f"auto does not tile: {self._untiled_text()})", field="refine")
        posteriors = self._posteriors(tensors, tiling)
        if not refine:
            return posteriors
        return [(self._refined(mean, image, refine), logvar) for (mean, logvar), image in zip(posteriors, tensors)]

    def _images(self, images: Any) -> Any:
        return images_to_tensors(images, max_pixels=self.options.max_pixels, background=self.options.background,
                                 keep_uint8=self._device_pixels)

    def _untiled_text(self) -> str:
        limits = self.limits
        if limits.tile_above_pixels is not None:
            return f"up to {limits.tile_above_pixels} pixels"
        return f"sides up to {limits.tile_threshold} px"

    def _check_indices_request(self, *, sample: bool, packed: bool, refine: int) -> None:
        if self._codebook is None:
            raise InvalidInputError(f"{self.info.model_class} {self.info.name!r} has no codebook: indices need a "
                                    "VQ model", field="indices")
        for name, value in (("sample", sample), ("packed", packed), ("refine", refine)):
            if value:
                raise InvalidInputError(f"indices do not combine with {name}", field=name)

    def _refined(self, mean: torch.Tensor, image: torch.Tensor, steps: int) -> torch.Tensor:
        """The raw latent `mean` of `image` [3, H, W] after `steps` steps against the decoder (float32)."""
        model = self._model if not self.placement.low_precision else self._float32_model()
        target = normalise(image) if image.dtype == torch.uint8 else image
        refined = refine_latent(lambda z: self._decode_batch(z, model), target.to(self.placement.device), mean.to(
            self.placement.device), steps)
        return refined.detach().float().cpu()

    def latents_from_posterior(self, mean: torch.Tensor, logvar: torch.Tensor | None, *, sample: bool = False,
                               seed: int | None = None, index: int = 0, scaled: bool = True) -> torch.Tensor:
        """What `encode` returns for the `index`-th image of a call, given its posterior: the mean or a
        draw seeded by (seed, index), then scaled. Callers that batch images of several calls
        together (the server) use it to give each call exactly its in-process result."""
        z = mean
        if sample:
            z = mean + torch.exp(0.5 * logvar) * gaussian_like(tuple(mean.shape), seed, index)
        return self.scale(z) if scaled else z

    def posterior(self, images: Any, *, tiling: Tiling = "auto",
                  refine: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Raw posterior (mean, log-variance) per image, each [C, h, w]; log-variance is None for
        deterministic models. Always a list, whatever form `images` has. `refine=N`: each mean after
        N steps against the decoder, as in `encode`."""
        items = self._images(images)
        return self._refined_posteriors(items.tensors, tiling, refine)

    def _posteriors(self, tensors: list[torch.Tensor],
                    tiling: Tiling) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        channels = self.info.latent_channels
        return [
            (moment[:channels], moment[channels:] if self.info.has_posterior else None)
            for moment in self._encode_moments(tensors, tiling)
        ]

    def decode(
        self,
        latents: Any,
        *,
        scaled: bool = True,
        sizes: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
        output: OutputKind = "numpy",
        tiling: Tiling = "auto",
        packed: bool = False,
    ) -> Any:
        """Latents -> images: uint8 HWC arrays (default), PIL images, or float tensors in [-1, 1].

        `sizes` gives the original (height, width) to crop each decoded image back to, one pair
        for all items or one per item; without it images keep the latent grid size x 8.
        `packed=True`: FLUX.1's packed latents [tokens, C * 4] ([N, tokens, C * 4], or a list), unpacked
        by `sizes` (required) as FluxPipeline does: each side rounded down to a multiple of twice the
        factor, the size the images come back in.
        VQ models also take integer codebook indices [h, w] ([N, h, w], or a list): their codebook
        vectors are decoded (`scaled` does not apply; `packed` does not combine).
        """
        if self._codebook is not None and are_indices(latents):
            if packed:
                raise InvalidInputError("codebook indices do not combine with packed", field="packed")
            items = indices_to_tensors(latents, self.info.codebook_size)
            raw = [lookup(codes, self._codebook) for codes in items.tensors]
        else:
            if packed:
                latents, sizes = self._unpack(latents, sizes)
            items = latents_to_tensors(latents, self.info.latent_channels)
            raw = [self.unscale(z) if scaled else z for z in items.tensors]
        crops = self._crop_sizes(sizes, raw)
        decoded = self._decode_tensors(raw, tiling, pixels=self._pixels_out(output))
        cropped = [image[:, :height, :width] for image, (height, width) in zip(decoded, crops)]
        return format_images(cropped, items.form, output)

    def _unpack(self, latents: Any, sizes: Any) -> tuple[Any, list[tuple[int, int]]]:
        """Packed latents in any accepted form -> [C, h, w] latents in the same form, and their image sizes."""
        if sizes is None:
            raise InvalidInputError("packed latents need sizes: each image's (height, width)", field="sizes")
        if isinstance(latents, (list, tuple)):
            tokens, form = [torch.as_tensor(item) for item in latents], "list"
        else:
            tensor = torch.as_tensor(latents)
            tokens, form = (list(tensor.unbind(0)), "batch") if tensor.dim() == 3 else ([tensor], "single")
        pairs = list(sizes)
        if len(pairs) == 2 and all(isinstance(v, int) for v in pairs):
            pairs = [tuple(pairs)] * len(tokens)
        if len(pairs) != len(tokens):
            raise InvalidInputError(f"sizes has {len(pairs)} entries for {len(tokens)} latents", field="sizes")
        unpacked, full = [], []
        for item, (height, width) in zip(tokens, pairs):
            if min(height, width) < 2 * self.factor:
                raise InvalidInputError(f"packed latents need image sizes of at least {2 * self.factor}, got "
                                        f"{height}x{width}", field="sizes")
            unpacked.append(unpack_latents(item.float(), height, width, self.factor))
            rows, cols = packed_latent_size(height, width, self.factor)
            full.append((rows * self.factor, cols * self.factor))
        return (unpacked[0] if form == "single" else torch.stack(unpacked) if form == "batch" else unpacked), full

    def roundtrip(self, images: Any, *, output: OutputKind = "numpy", tiling: Tiling = "auto") -> Any:
        """Encode then decode, cropping back to each image's original size."""
        items = self._images(images)
        reconstructed = self._roundtrip_tensors(items.tensors, tiling, pixels=self._pixels_out(output))
        return format_images(reconstructed, items.form, output)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [C, h, w] or [N, C, h, w] -> the diffusion model's convention: `(z - shift) * scale`,
        or with per-channel statistics `(z - mean) * scale / std` (SDXL-style pipelines; FLUX.2's
        BatchNorm, with scale 1), the pipelines' own expressions in their order."""
        if self._statistics is None:
            return (z - self.info.shift_factor) * self.info.scaling_factor
        mean, std = self._statistics
        return (z - mean) * self.info.scaling_factor / std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale`: `latents / scale + shift`, or `latents * std / scale + mean`."""
        if self._statistics is None:
            return latents / self.info.scaling_factor + self.info.shift_factor
        mean, std = self._statistics
        return latents * std / self.info.scaling_factor + mean

    def interpolate(self, image_a: Any, image_b: Any, steps: int = 8, method: str = "slerp", *,
                    output: OutputKind = "numpy") -> list:
        """Decode `steps` points on the lerp or slerp path between the posterior means of two images."""
        items = self._images([image_a, image_b])
        if items.tensors[0].shape != items.tensors[1].shape:
            raise InvalidInputError(f"interpolation needs two images of one size, got "
                                    f"{tuple(items.tensors[0].shape[1:])} and {tuple(items.tensors[1].shape[1:])}",
                                    field="images")
        (a, _), (b, _) = self._posteriors(items.tensors, "auto")
        path = interpolation_path(a, b, steps, method)
        height, width = items.tensors[0].shape[1:]
        decoded = self._decode_tensors(list(path.unbind(0)), "auto", pixels=self._pixels_out(output))
        return format_images([image[:, :height, :width] for image in decoded], "list", output)

    def sample_prior(self, n: int, height: int, width: int, seed: int = 0, *, output: OutputKind = "numpy") -> list:
        """Decode `n` draws z ~ N(0, I) of the raw latent space into height x width images."""
        if n < 1 or height < 1 or width < 1:
            raise InvalidInputError("n, height and width must be positive", field="n")
        if height * width > self.options.max_pixels:
            raise InvalidInputError(f"{height}x{width} exceeds the limit of {self.options.max_pixels} pixels",
                                    field="height")
        shape = latent_shape(self.info.latent_channels, self.factor, height, width)
        latents = [gaussian_like(shape, seed, index) for index in range(n)]
        decoded = self._decode_tensors(latents, "auto", pixels=self._pixels_out(output))
        return format_images([image[:, :height, :width] for image in decoded], "list", output)

    def anomaly_score(self, images: Any) -> list[AnomalyScore]:
        """Per-image reconstruction error (MSE and PSNR on 8-bit RGB)."""
        items = self._images(images)
        reconstructed = self._roundtrip_tensors(items.tensors, "auto", pixels=self._device_pixels)
        scores = []
        for original, reconstruction in zip(items.tensors, reconstructed):
            a, b = tensor_to_uint8(original), tensor_to_uint8(reconstruction)
            scores.append(AnomalyScore(mse=mse(a, b), psnr=psnr(a, b)))
        return scores

    def is_tiled(self, height: int, width: int, *, decode: bool, tiling: Tiling = "auto") -> bool:
        """Whether encoding a height x width image (or decoding latents back to it) goes tile by tile."""
        f = self.factor
        if decode:
            return self._tiling_predicate(tiling, f)(-(-height // f), -(-width // f))
        return self._tiling_predicate(tiling, 1)(height, width)

    def model_calls(self, height: int, width: int, *, decode: bool, tiling: Tiling = "auto") -> dict[int, int]:
        """The model calls that encode a height x width image (or decode latents back to it), as
        {image pixels of one call: how many such calls}: one call of the size padded to the factor,
        or one per tile, each tile's overlap included (RECOMPUTED_TILE_WORK per tile when tiles
        recompute the image's statistics). What the work costs, known before it runs."""
        f = self.factor
        grid_h, grid_w = -(-height // f), -(-width // f)
        if not self.is_tiled(height, width, decode=decode, tiling=tiling):
            return {grid_h * grid_w * f * f: 1}
        tile, overlap = self.limits.tile_size // f, self.options.tile_overlap // f
        repeats = RECOMPUTED_TILE_WORK if self.options.tile_norms == "image-recompute" else 1
        rows = collections.Counter(end - start for start, end in tile_spans(grid_h, tile, overlap))
        cols = collections.Counter(end - start for start, end in tile_spans(grid_w, tile, overlap))
        calls: collections.Counter[int] = collections.Counter()
        for row, row_count in rows.items():
            for col, col_count in cols.items():
                calls[row * col * f * f] += row_count * col_count * repeats
        return dict(calls)

    # ---- batching, padding, tiling ---------------------------------------------------------

    def _pixels_out(self, output: Any) -> bool:
        """Whether decoded images may come back from the device as uint8 (the caller wants 8-bit pixels)."""
        return self._device_pixels and output != "tensor" and output != "torch"

    def _roundtrip_tensors(self, tensors: list[torch.Tensor], tiling: Tiling, *,
                           pixels: bool = False) -> list[torch.Tensor]:
        means = [mean for mean, _ in self._posteriors(tensors, tiling)]
        decoded = self._decode_tensors(means, tiling, pixels=pixels)
        return [image[:, : t.shape[1], : t.shape[2]] for image, t in zip(decoded, tensors)]

    def _encode_moments(self, images: list[torch.Tensor], tiling: Tiling) -> list[torch.Tensor]:
        """[3, H, W] images -> per-image [C or 2C, h, w] posterior mean (and log-variance)."""
        f = self.factor
        limits = self.limits

        def run_batch(batch: torch.Tensor) -> torch.Tensor:
            # Device pixels are padded on the device, after the uint8 transfer.
            return self._run(self._encode_batch, batch if self._device_pixels else _pad_to_multiple(batch, f),
                             split=True)
        return _map_grouped(
            images,
            run_batch,
            lambda image: self._tiled(image, self._encode_batch, pad=True, pixels=False),
            per_batch=lambda h, w: limits.max_batch_pixels // (h * w),
            tile=self._tiling_predicate(tiling, 1),
            stack=self._stack,
            tile_on_oom=tiling == "auto",
        )

    def _decode_tensors(self, latents: list[torch.Tensor], tiling: Tiling, *, pixels: bool = False
                        ) -> list[torch.Tensor]:
        """Latents -> [3, H, W] images: float in [-1, 1], or with `pixels` (device pixels only) uint8."""
        f = self.factor
        limits = self.limits
        return _map_grouped(
            latents,
            lambda batch: self._run(self._decode_batch, batch, pixels=pixels, split=True),
            lambda latent: self._tiled(latent, self._decode_batch, pad=False, pixels=pixels),
            per_batch=lambda h, w: limits.max_batch_pixels // (h * w * f * f),
            tile=self._tiling_predicate(tiling, f),
            stack=self._stack,
            tile_on_oom=tiling == "auto",
        )

    def _tiled(self, x: torch.Tensor, batch_fn: Callable[..., torch.Tensor], *, pad: bool,
               pixels: bool) -> torch.Tensor:
        """`batch_fn` over `x` [C, H, W] tile by tile: images (pad=True, padded to the factor) or latents."""
        f, opts, limits = self.factor, self.options, self.limits
        scales = {"in_scale": f, "out_scale": 1} if pad else {"in_scale": 1, "out_scale": f}
        tile, overlap = limits.tile_size // f, opts.tile_overlap // f
        shared, recompute = opts.tile_norms != "tile", opts.tile_norms == "image-recompute"
        if self._device_pixels:
            # The whole image crosses once; its tiles are cut, batched and blended on the device, and
            # a float32 retry reruns the whole image.
            def on_device(image: torch.Tensor, model: nn.Module | None) -> torch.Tensor:
                source = self._on_device(image[None])
                source = (_pad_to_multiple(source, f) if pad else source)[0]
                return tiled_map(source, lambda tiles: batch_fn(tiles, model), tile=tile, overlap=overlap,
                                 batch_size=limits.tiles_per_pass, shared_norms=shared, recompute_norms=recompute,
                                 **scales)
            return self._run(on_device, x, pixels=pixels)
        source = _pad_to_multiple(x[None], f)[0] if pad else x
        if not shared:
            return tiled_map(source, lambda tiles: self._run(batch_fn, tiles), tile=tile, overlap=overlap,
                             batch_size=limits.tiles_per_pass, **scales)

        # Tiles sharing statistics run together: a float32 retry reruns the whole image, not one tile.
        def whole(image: torch.Tensor, model: nn.Module | None) -> torch.Tensor:
            return tiled_map(image, lambda tiles: batch_fn(tiles, model), tile=tile, overlap=overlap,
                             shared_norms=True, recompute_norms=recompute, **scales)
        return self._run(whole, source)

    def _tiling_predicate(self, tiling: Tiling, pixels_per_unit: int) -> Callable[[int, int], bool]:
        if tiling not in TILING_MODES:
            raise InvalidInputError(f"tiling must be one of {', '.join(TILING_MODES)}, got {tiling!r}", field="tiling")
        limits = self.limits
        return lambda h, w: tiling == "on" or (
            tiling == "auto" and limits.tiles(h * pixels_per_unit, w * pixels_per_unit)
        )

    def _crop_sizes(self, sizes: Any, latents: list[torch.Tensor]) -> list[tuple[int, int]]:
        full = [(z.shape[-2] * self.factor, z.shape[-1] * self.factor) for z in latents]
        if sizes is None:
            return full
        pairs = list(sizes)
        if len(pairs) == 2 and all(isinstance(v, int) for v in pairs):
            pairs = [tuple(pairs)] * len(latents)
        if len(pairs) != len(latents):
            raise InvalidInputError(f"sizes has {len(pairs)} entries for {len(latents)} latents", field="sizes")
        for index, ((height, width), (max_h, max_w)) in enumerate(zip(pairs, full)):
            if not (0 < height <= max_h and 0 < width <= max_w):
                raise InvalidInputError(f"sizes[{index}] = {height}x{width} does not fit the decoded "
                                        f"{max_h}x{max_w}", field="sizes")
        return [(int(h), int(w)) for h, w in pairs]

    # ---- model calls ----------------------------------------------------------------------

    def _encode_batch(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self._model
        output = model.encode(self._model_input(x, model, pad=self._device_pixels))
        patch = self.info.patch_size
        if hasattr(output, "latent_dist"):
            dist = output.latent_dist
            return torch.cat([patchify(dist.mean, patch), patchify(dist.logvar, patch)], dim=1)
        if hasattr(output, "latent"):  # AutoencoderDC
            return output.latent
        return output.latents

    def _decode_batch(self, z: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self._model
        return model.decode(self._model_input(unpatchify(z, self.info.patch_size), model)).sample

    def _model_input(self, x: torch.Tensor, model: nn.Module, *, pad: bool = False) -> torch.Tensor:
        """A batch as the model takes it: on its device, in its dtype, channels last; device pixels:
        uint8 normalised and (with `pad`) padded to the factor there."""
        dtype = next(model.parameters()).dtype
        if not self._device_pixels:
            # One copy: device, dtype and memory format in a single conversion.
            return x.to(device=self.placement.device, dtype=dtype, memory_format=torch.channels_last,
                        non_blocking=True)
        x = self._on_device(x)
        if pad:
            x = _pad_to_multiple(x, self.factor)
        return x.to(dtype=dtype, memory_format=torch.channels_last)

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        """A host batch on the device (pinned, asynchronous on CUDA), uint8 pixels normalised to float32 in
        [-1, 1] there; a tensor already there passes as it is."""
        if x.device.type != self.placement.device.type:  # "cuda" and "cuda:0" are one device
            x = from_host(x, self.placement.device)
        return normalise(x) if x.dtype == torch.uint8 else x

    def _stack(self, items: list[torch.Tensor]) -> torch.Tensor:
        """One batch of equal-shaped items; on CUDA straight into a pinned, channels-last host buffer."""
        if self.placement.device.type != "cuda":
            return torch.stack(items)
        first = items[0]
        layout = torch.channels_last if first.dim() == 3 else torch.contiguous_format
        batch = torch.empty((len(items), *first.shape), dtype=first.dtype, pin_memory=True, memory_format=layout)
        for row, item in zip(batch, items):
            row.copy_(item)
        return batch

    def _run(self, fn: Callable[..., torch.Tensor], batch: torch.Tensor, *, pixels: bool = False,
             split: bool = False) -> torch.Tensor:
        """Run `fn` on one batch; on NaN/inf in half precision, run it again in float32, and keep the
        model in float32 from then on. One finiteness check (one device sync) when nothing overflows.
        `pixels`: the result comes back as uint8 (device pixels only). `split`: a batch that runs out of
        device memory runs again in halves."""
        try:
            return self._run_once(fn, batch, pixels)
        except torch.OutOfMemoryError:
            if not split or batch.shape[0] < 2:
                raise
        # Outside the except block: its traceback held the failed attempt's frames and their activations.
        logger.warning("%s: out of device memory on a batch of %d; running it in halves", self.info.name,
                       batch.shape[0])
        if self.placement.device.type == "cuda":
            torch.cuda.empty_cache()
        half = (batch.shape[0] + 1) // 2
        return torch.cat([self._run(fn, part, pixels=pixels, split=True) for part in batch.split(half)])

    def _run_once(self, fn: Callable[..., torch.Tensor], batch: torch.Tensor, pixels: bool) -> torch.Tensor:
        with torch.inference_mode():
            in_half = self.placement.low_precision and not self._fp32_for_good
            result, finite = self._finish(fn(batch, self._float32_model() if self._fp32_for_good else None), pixels)
            if not finite and in_half:
                logger.warning("%s: non-finite output in %s; this batch and the model's later ones run in float32",
                               self.info.name, self.placement.dtype)
                self._fp32_for_good = True
                result, finite = self._finish(fn(batch, self._float32_model()), pixels)
            if not finite:
                raise NumericalError(f"model {self.info.name!r} produced NaN or infinite values")
            return result

    def _finish(self, result: torch.Tensor, pixels: bool) -> tuple[torch.Tensor, bool]:
        """A model output on the host (float32, or with `pixels` uint8) and whether it was finite."""
        if not self._device_pixels:
            result = result.float()
            return result.cpu(), bool(torch.isfinite(result).all())
        return to_host(result, denormalise(result) if pixels else result.float())

    def _float32_model(self) -> nn.Module:
        assert self._fp32_model is not None  # kept whenever the codec runs in low precision
        with self._fp32_lock:
            if not self._fp32_ready:
                with torch.inference_mode(False):  # ordinary parameters, not inference tensors
                    nn.Module.to(self._fp32_model, device=self.placement.device, memory_format=torch.channels_last)
                self._fp32_ready = True
        return self._fp32_model


def _compile(model: nn.Module, mode: str) -> None:
    """torch.compile the encoder and decoder in place (their state_dict keys stay as they are), for any
    input size: the first call (a server's warm-up) compiles a graph that later sizes reuse."""
    for name in ("encoder", "decoder"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            module.compile(mode=None if mode == "default" else mode, dynamic=True)


def _statistics(info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel (mean, std) as float32 [C, 1, 1] tensors (broadcasting over [C, h, w] and
    [N, C, h, w]), or None for models scaled by shift_factor alone."""
    if not info.latents_mean:
        return None
    return (torch.tensor(info.latents_mean, dtype=torch.float32).view(-1, 1, 1),
            torch.tensor(info.latents_std, dtype=torch.float32).view(-1, 1, 1))


def _safe_placement(placement: Placement, model: nn.Module, name: str) -> Placement:
    """float16 on a model whose config sets `force_upcast` (its activations overflow float16, as the
    SD and SDXL VAEs' do) becomes bfloat16 where the device computes it natively, else float32: what
    diffusers pipelines do, chosen up front instead of a NaN and a retry on every batch."""
    config = getattr(model, "config", None)
    if placement.dtype != torch.float16 or not getattr(config, "force_upcast", False):
        return placement
    safe = torch.bfloat16 if native_bf16(placement.device) else torch.float32
    logger.info("%s: its config says force_upcast; running in %s instead of float16", name,
                str(safe).removeprefix("torch."))
    return Placement(placement.device, safe)


def _pad_to_multiple(batch: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad the bottom and right edges to a multiple of `factor`: reflect, or replicate when the
    image is too small to reflect."""
    height, width = batch.shape[-2:]
    pad_h, pad_w = -height % factor, -width % factor
    if not pad_h and not pad_w:
        return batch
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)


def _map_grouped(
    items: list[torch.Tensor],
    batch_fn: Callable[[torch.Tensor], torch.Tensor],
    tiled_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    per_batch: Callable[[int, int], int],
    tile: Callable[[int, int], bool],
    stack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack,
    tile_on_oom: bool = False,
) -> list[torch.Tensor]:
    """Group items by shape (and dtype: uint8 pixels and float tensors in one call), run each group in
    memory-bounded batches (or tile by tile), and return the results in input order. `tile_on_oom`: a
    batch out of device memory (after its halves, see Codec._run) runs its images tiled."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((*item.shape, item.dtype), []).append(index)
    results: list[torch.Tensor | None] = [None] * len(items)
    for key, indices in groups.items():
        height, width = key[-3:-1]
        if tile(height, width):
            for index in indices:
                results[index] = tiled_fn(items[index])
            continue
        size = max(1, per_batch(height, width))
        for first in range(0, len(indices), size):
            checkpoint()
            chunk = indices[first : first + size]
            try:
                outputs = batch_fn(stack([items[i] for i in chunk]))
            except torch.OutOfMemoryError:
                # What the memory estimate let through untiled did not fit even alone (batches were
                # halved already): with tiling="auto" those images run tiled instead.
                if not tile_on_oom:
                    raise
                outputs = None
            if outputs is None:
                logger.warning("out of device memory on %d image(s) of %dx%d even one at a time; tiling them",
                               len(chunk), height, width)
                for index in chunk:
                    results[index] = tiled_fn(items[index])
                continue
            if outputs.shape[0] != len(chunk):
                raise RuntimeError(f"model returned {outputs.shape[0]} outputs for {len(chunk)} inputs")
            for index, output in zip(chunk, outputs):
                results[index] = output
    return results  # type: ignore[return-value]


def load_codec(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    options: CodecOptions | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    random_seed: int | None = None,
) -> Codec:
    """Load a model (see `load_model` for what `name_or_path` may be) and wrap it in a `Codec`."""
    loaded = load_model(name_or_path, config=config, random_seed=random_seed)
    return Codec(loaded.model, name=loaded.name, device=device, dtype=dtype, options=options)

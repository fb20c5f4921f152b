"""Training-time vector quantisation for a diffusers VQModel: nearest codes, straight-through gradients,
EMA codebook updates, data-dependent initialisation and dead-code restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VQConfig


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The index of the nearest codebook row (Euclidean) for each row of `vectors` [N, D]: the
    distance diffusers' VectorQuantizer uses at inference, so training and serving pick the same codes."""
    return torch.argmin(torch.cdist(vectors, codebook), dim=1)


def codebook_losses(z: torch.Tensor, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ||sg[z] - e||^2, commitment loss ||z - sg[e]||^2), each a mean over values: the first
    moves the codes towards the encoder outputs, the second the encoder towards its codes."""
    return F.mse_loss(z_q, z.detach()), F.mse_loss(z, z_q.detach())


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_q in the forward pass, the identity in the backward pass: the decoder's gradient reaches the encoder."""
    return z + (z_q - z).detach()


def code_usage(indices: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, int]:
    """(perplexity exp(H(p)) of the codes' frequencies p, number of distinct codes): the collapse monitor.
    Perplexity 1 means every vector took one code; codebook_size means all were used equally."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return entropy.exp().float(), int((counts > 0).sum())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class CodebookTrainer(nn.Module):
    """Quantises encoder outputs against a VQModel's codebook and, in training mode, updates the codebook.

    The codebook stays the VQModel's own `quantize.embedding` (passed to `forward`), so the exported
    model needs no conversion; this module holds only the training statistics, as buffers saved in
    every checkpoint (resume continues them exactly).
    """

    def __init__(self, codebook_size: int, dim: int, config: VQConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # EMA of vectors per code
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))  # EMA of their sum
        self.register_buffer("unused", torch.zeros(codebook_size, dtype=torch.long))  # batches in a row unused
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, z: torch.Tensor, codebook: nn.Embedding, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (straight-through z_q, codebook loss, commitment loss, indices [B, h, w])."""
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
        if self.training and not bool(self.initialised):
            with torch.no_grad():
                self._initialise(flat.detach().float(), codebook.weight, generator)
        with torch.no_grad():
            indices = nearest_codes(flat.detach().to(codebook.weight.dtype), codebook.weight)
        z_q = codebook(indices).to(z.dtype)
        codebook_loss, commitment = codebook_losses(flat, z_q)
        if self.training:
            with torch.no_grad():
                self._update(flat.detach().float(), indices, codebook.weight, generator)
        z_q = straight_through(flat, z_q).reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        return z_q, codebook_loss, commitment, indices.reshape(batch, height, width)

    def _initialise(self, vectors: torch.Tensor, weight: torch.Tensor, generator: torch.Generator | None) -> None:
        """Codes start at random encoder outputs of the first batch (as many as it has), so the first
        steps do not send every vector to the one code nearest a tiny random initialisation."""
        if torch.isfinite(vectors).all():
            self._restart(torch.arange(weight.shape[0], device=weight.device), vectors, weight, generator)
            self.initialised.fill_(True)

    def _update(self, vectors: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                generator: torch.Generator | None) -> None:
        if not torch.isfinite(vectors).all():  # the trainer skips this step; keep the codebook as it was
            return
        size = weight.shape[0]
        counts = torch.bincount(indices, minlength=size).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, vectors)
        if _distributed():  # every process applies the same update to its copy of the codebook
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.unused.copy_(torch.where(counts > 0, torch.zeros_like(self.unused), self.unused + 1))
        if self.config.ema:
            decay = self.config.ema_decay
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            # Each live code is the EMA-weighted mean of the vectors assigned to it: both averages
            # carry the same start-up bias, which their ratio cancels.
            live = self.cluster_size > 0
            weight[live] = (self.embed_sum[live] / self.cluster_size[live, None]).to(weight.dtype)
        if self.config.restart_after > 0:
            dead = torch.nonzero(self.unused >= self.config.restart_after).flatten()
            if dead.numel():
                self._restart(dead, vectors, weight, generator)

    def _restart(self, codes: torch.Tensor, vectors: torch.Tensor, weight: torch.Tensor,
                 generator: torch.Generator | None) -> None:
        """Move `codes` onto distinct random rows of `vectors` (at most one code per vector) and clear
        their statistics; with several processes, process 0's choice is everyone's."""
        order = torch.randperm(vectors.shape[0], generator=generator, device=generator.device if generator
                               is not None else vectors.device).to(vectors.device)
        count = min(codes.numel(), vectors.shape[0])
        codes = codes[:count]
        weight[codes] = vectors[order[:count]].to(weight.dtype)
        self.cluster_size[codes] = 0
        self.embed_sum[codes] = 0
        self.unused[codes] = 0
        if _distributed():
            for tensor in (weight.data, self.cluster_size, self.embed_sum, self.unused):
                torch.distributed.broadcast(tensor, 0)


class VQAutoencoderForTraining(nn.Module):
    """Wraps a VQModel so one `forward` (what DDP synchronises) returns all the VQ loss needs:
    (reconstruction, codebook loss, commitment loss, code indices)."""

    def __init__(self, vae: nn.Module, config: VQConfig):
        super().__init__()
        self.vae = vae
        embedding = vae.quantize.embedding
        self.codebook = CodebookTrainer(embedding.num_embeddings, embedding.embedding_dim, config)
        # With EMA updates the codebook is no optimiser's business (and the model EMA copies it as it is).
        embedding.weight.requires_grad_(not config.ema)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        vae = self.vae
        h = vae.encode(x).latents  # pre-quantisation latents (after quant_conv)
        z_q, codebook_loss, commitment, indices = self.codebook(h, vae.quantize.embedding, generator)
        # VQModel.decode minus its own quantiser: post_quant_conv, then the decoder (which reads the
        # codes themselves too in MoVQ's spatial norm).
        spatial = z_q if vae.config.norm_type == "spatial" else None
        reconstruction = vae.decoder(vae.post_quant_conv(z_q), spatial)
        return reconstruction, codebook_loss, commitment, indices

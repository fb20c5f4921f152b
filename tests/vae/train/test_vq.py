"""VQ-VAE training: the quantiser's losses, gradients and codebook updates on tiny tensors, then real runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from latentd.vae import Codec, load_model
from latentd.vae.errors import InvalidInputError
from latentd.vae.train.checkpoint import STATE_FILE, list_checkpoints
from latentd.vae.train.config import LossConfig, VQConfig, load_config
from latentd.vae.train.losses import vq_generator_loss
from latentd.vae.train.quantizer import (
    CodebookTrainer,
    VQAutoencoderForTraining,
    code_usage,
    codebook_losses,
    nearest_codes,
    straight_through,
)
from latentd.vae.train.trainer import training_function
from tests.vae.train.conftest import TINY_ARCHITECTURE

TINY_VQ = {**TINY_ARCHITECTURE, "num_vq_embeddings": 32, "vq_embed_dim": 3, "mid_block_add_attention": False}


def _tiny_vq():
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(**TINY_VQ)


def _rows(run_dir, column):
    import csv

    with (run_dir / "metrics.csv").open() as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row[column]]


def test_nearest_codes_and_losses_match_their_formulas():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.5]])
    z = torch.tensor([[0.1, -0.2], [0.9, 1.3], [-1.5, 0.0], [0.6, 0.6]])
    indices = nearest_codes(z, codebook)
    assert indices.tolist() == [0, 1, 2, 1]
    z_q = codebook[indices]
    codebook_loss, commitment = codebook_losses(z, z_q)
    expected = ((z - z_q) ** 2).sum() / z.numel()
    torch.testing.assert_close(codebook_loss, expected)
    torch.testing.assert_close(commitment, expected)
    # The codebook loss moves only the codes, the commitment loss only the encoder output.
    zg, qg = z.clone().requires_grad_(), z_q.clone().requires_grad_()
    codebook_losses(zg, qg)[0].backward()
    assert zg.grad is None and torch.allclose(qg.grad, 2 * (z_q - z) / z.numel())
    zg, qg = z.clone().requires_grad_(), z_q.clone().requires_grad_()
    codebook_losses(zg, qg)[1].backward()
    assert qg.grad is None and torch.allclose(zg.grad, 2 * (z - z_q) / z.numel())


def test_straight_through_passes_the_gradient_unchanged():
    z = torch.randn(5, 3, requires_grad=True)
    z_q = torch.randn(5, 3)
    out = straight_through(z, z_q)
    torch.testing.assert_close(out.detach(), z_q)  # z + (z_q - z): equal up to rounding
    (out * torch.arange(15.0).reshape(5, 3)).sum().backward()
    assert torch.equal(z.grad, torch.arange(15.0).reshape(5, 3))


def test_code_usage_perplexity():
    perplexity, used = code_usage(torch.tensor([0, 0, 0, 0]), 8)
    assert used == 1 and perplexity.item() == pytest.approx(1.0)
    perplexity, used = code_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert used == 4 and perplexity.item() == pytest.approx(4.0)
    perplexity, _ = code_usage(torch.tensor([0, 0, 0, 1]), 8)
    p = torch.tensor([0.75, 0.25])
    assert perplexity.item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_vq_loss_total_is_reconstruction_plus_the_weighted_codebook_terms():
    torch.manual_seed(0)
    x, reconstruction = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    codebook, commitment = torch.tensor(0.3), torch.tensor(0.3)
    indices = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 1]]])
    for ema, expected_penalty in ((True, 0.25 * 0.3), (False, 0.3 + 0.25 * 0.3)):
        config = LossConfig(vq=VQConfig(commitment=0.25, ema=ema))
        parts = vq_generator_loss(x, reconstruction, codebook, commitment, indices, 4, step=0, config=config)
        l1 = (reconstruction - x).abs().mean()
        torch.testing.assert_close(parts.reconstruction, l1)
        torch.testing.assert_close(parts.total, l1 + expected_penalty)
        assert parts.codes_used == 3 and parts.kl is None


def test_ema_update_moves_each_used_code_to_the_mean_of_its_vectors():
    codebook = torch.nn.Embedding(3, 2)
    trainer = CodebookTrainer(3, 2, VQConfig(ema=True, ema_decay=0.5, restart_after=0)).train()
    trainer.initialised.fill_(True)  # keep the hand-set codebook
    with torch.no_grad():
        codebook.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 0.0]]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]).t().reshape(1, 2, 1, 3)  # [B, D, h, w]
    trainer(z, codebook)
    # First update: cluster sizes 0.5 * counts, sums 0.5 * sums: each used code is its vectors' mean.
    torch.testing.assert_close(codebook.weight[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(codebook.weight[1], torch.tensor([9.0, 9.0]))
    torch.testing.assert_close(codebook.weight[2], torch.tensor([-10.0, 0.0]))  # unused: unchanged
    torch.testing.assert_close(trainer.cluster_size, torch.tensor([1.0, 0.5, 0.0]))
    assert trainer.unused.tolist() == [0, 0, 1]


def test_dead_codes_restart_at_batch_vectors():
    codebook = torch.nn.Embedding(4, 2)
    with torch.no_grad():
        codebook.weight.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    trainer = CodebookTrainer(4, 2, VQConfig(ema=True, restart_after=2)).train()
    trainer.initialised.fill_(True)
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.2, 0.2]]).t().reshape(1, 2, 1, 3)
    generator = torch.Generator().manual_seed(0)
    trainer(z, codebook, generator)
    assert trainer.unused.tolist() == [0, 1, 1, 1]
    trainer(z, codebook, generator)  # codes 1-3 unused twice: restarted at the three batch vectors
    restarted = {tuple(round(v, 4) for v in row) for row in codebook.weight[1:].tolist()}
    assert restarted == {(0.1, 0.0), (0.0, 0.1), (0.2, 0.2)}
    assert trainer.unused.tolist() == [0, 0, 0, 0]
    _, _, _, indices = trainer(z, codebook, generator)
    assert len(set(indices.flatten().tolist())) == 3  # the restarted codes take the vectors over


def test_first_batch_initialises_the_codebook_from_encoder_outputs():
    codebook = torch.nn.Embedding(4, 2)
    trainer = CodebookTrainer(4, 2, VQConfig(ema=False)).train()  # no EMA step to move them afterwards
    z = torch.randn(1, 2, 2, 3) * 5
    trainer(z, codebook, torch.Generator().manual_seed(1))
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for row in codebook.weight:
        assert torch.isclose(vectors, row).all(dim=1).any()
    assert bool(trainer.initialised)


def test_the_straight_through_gradient_reaches_the_encoder():
    module = VQAutoencoderForTraining(_tiny_vq(), VQConfig(ema=True)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, codebook_loss, commitment, indices = module(x, torch.Generator().manual_seed(0))
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long
    F.mse_loss(reconstruction, x).backward()  # the reconstruction alone: only straight-through reaches the encoder
    encoder_grad = module.vae.encoder.conv_in.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert module.vae.quantize.embedding.weight.grad is None  # EMA: the codebook is not trained by gradient


def test_without_ema_the_codebook_loss_trains_the_codebook():
    module = VQAutoencoderForTraining(_tiny_vq(), VQConfig(ema=False)).train()
    _, codebook_loss, _, _ = module(torch.rand(1, 3, 16, 16) * 2 - 1)
    codebook_loss.backward()
    assert module.vae.quantize.embedding.weight.grad.abs().sum() > 0


def _vq_config(write_config, name="vq", **overrides):
    return load_config(write_config(name, model={"type": "vq", "architecture": TINY_VQ}),
                       {"loss.vq.restart_after": "4", **overrides})


def test_vq_training_lowers_the_loss_uses_many_codes_and_exports(write_config):
    config = _vq_config(write_config, **{"optim.max_steps": "30", "runtime.save_every": "15",
                                         "runtime.val_every": "15"})
    summary = training_function(config, progress=False)
    losses = _rows(summary.run_dir, "reconstruction")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert min(_rows(summary.run_dir, "codes_used")[-5:]) > 1
    assert _rows(summary.run_dir, "perplexity")[-1] > 1
    assert _rows(summary.run_dir, "val_codes_used")[-1] > 1 and _rows(summary.run_dir, "val_psnr")
    loaded = load_model(summary.exported)
    assert type(loaded.model).__name__ == "VQModel" and loaded.model.config.scaling_factor == 1.0
    codec = Codec(loaded.model, dtype="float32")
    assert (codec.info.codebook_size, codec.info.codebook_dim, codec.info.latent_channels) == (32, 3, 3)


def test_vq_resume_continues_exactly(tmp_path, write_config):
    """As the KL resume test: 12 steps straight vs resumed from the step-7 checkpoint, with restarts
    and EMA codebook updates inside both."""
    straight = training_function(_vq_config(write_config, "straight", **{"runtime.save_every": "7"}),
                                 progress=False, export=False)
    halfway = list_checkpoints(straight.run_dir)[0]
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(halfway, resumed_dir / "checkpoints" / halfway.name)
    resumed = training_function(_vq_config(write_config, "resumed", **{"runtime.save_every": "7"}),
                                resume="latest", progress=False, export=False)
    assert resumed.steps == 12
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(straight.checkpoint / name)), load_file(str(resumed.checkpoint / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    model = load_file(str(straight.checkpoint / "model.safetensors"))
    assert "codebook.cluster_size" in model and int(model["codebook.unused"].max()) < 4
    assert json.loads((resumed.checkpoint / STATE_FILE).read_text())["step"] == 12


def test_vq_with_the_discriminator_runs(write_config):
    config = _vq_config(write_config, **{"optim.max_steps": "4", "loss.discriminator.enabled": "true",
                                         "loss.discriminator.start_step": "2", "loss.discriminator.channels": "8"})
    summary = training_function(config, progress=False, export=False)
    assert summary.steps == 4 and _rows(summary.run_dir, "d_loss")


def test_bad_vq_settings_are_clear_errors(write_config):
    with pytest.raises(InvalidInputError, match="model.type"):
        load_config(write_config(), {"model.type": "vqgan"})
    with pytest.raises(InvalidInputError, match="ema_decay"):
        load_config(write_config(), {"loss.vq.ema_decay": "1.0"})
    with pytest.raises(InvalidInputError, match="model.architecture"):
        training_function(load_config(write_config(model={"type": "vq", "architecture": {"bogus": 1}})),
                          progress=False)


def test_a_vq_model_starts_from_a_kl_model_with_its_posterior_means_and_decoder():
    from latentd.vae.train.vq_init import vq_from_kl
    from tests.conftest import make_tiny_kl

    kl = make_tiny_kl()
    architecture = {key: kl.config[key] for key in ("block_out_channels", "down_block_types", "up_block_types",
                                                    "layers_per_block", "latent_channels", "norm_num_groups")}
    vq = vq_from_kl(kl, {**architecture, "num_vq_embeddings": 16}).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vq.encode(x).latents, kl.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-5)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(vq.decode(z, force_not_quantize=True).sample, kl.decode(z).sample)
    with pytest.raises(InvalidInputError, match="latent channels"):
        vq_from_kl(kl, {**architecture, "vq_embed_dim": 3})
    with pytest.raises(InvalidInputError, match="layout differs"):
        vq_from_kl(kl, {**architecture, "block_out_channels": [16, 16]})


def test_the_vq_recipe_starts_from_the_default_model():
    from pathlib import Path

    from latentd.vae.train.prepare import build_model

    recipe = Path(__file__).resolve().parents[3] / "vae" / "train" / "configs" / "vq-f8.yaml"
    config = load_config(recipe)
    vq = build_model(config).eval()
    assert type(vq).__name__ == "VQModel" and vq.quantize.embedding.num_embeddings == 16384
    kl = load_model("default").model.float().eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vq.encode(x).latents, kl.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)

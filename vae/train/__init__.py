"""latentd.vae.train: configuration, data, losses, the accelerate training loop, checkpoints and export."""

"""latentd.archive: image collections as compact latent archives (sharded safetensors + SQLite manifest)."""

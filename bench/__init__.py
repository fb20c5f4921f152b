"""latentd.bench: tools that measure latentd (codec, tiling, archive, service load and soak)."""

"""latentd.bench: the tools that measure latentd (codec, tiling, archive, service load and soak); nothing in vae, server or client imports them."""

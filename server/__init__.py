"""latentd.server: the batched gRPC encode/decode service around `latentd.vae`."""

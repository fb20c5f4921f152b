"""latentd.evaluate: quality measurement (round trips, rate-distortion against classic and published codecs); nothing in vae, server or client imports it."""

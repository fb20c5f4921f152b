"""latentd.evaluate: quality measurement (round trips, rate-distortion against other codecs)."""

"""Data: the latent cache format and sample caches (records), the grain training pipeline (pipeline)."""

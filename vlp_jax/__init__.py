"""vlp_jax: vision-language pretraining with masking, in JAX/Flax."""

__version__ = "0.1.0"

"""vlp_jax: vision-language pretraining with masking, in JAX/Flax."""

import os as _os

# TensorFlow serves only host-side text ops and summaries here; its C++ INFO and
# WARNING lines (CUDA probing, oneDNN notices) are noise. A user's own setting wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

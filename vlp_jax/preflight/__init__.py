"""Compile a config's train step for a named TPU slice or GPU on a CPU host: `python -m
vlp_jax.preflight` (__main__.py); `step` builds and compiles, `fit` suggests and searches.
"""

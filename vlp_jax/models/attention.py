"""Softmax attention for every tower: cuDNN or XLA per platform and shape, with
attention-probability dropout and a memory-lean custom VJP on the heads-major CPU path."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vlp_jax import sharding
from vlp_jax.models.platform import target_platform

# config.model.attention: "auto" takes cuDNN flash attention where it can run, XLA's
# attention elsewhere; "cudnn" insists (and fails before compute where it cannot run).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _local_gpu() -> jax.Device | None:
  """This process's first GPU; None on a host without one, where a GPU program is
  compiled deviceless for a shipped CUDA target (vlp_jax.gpu_targets)."""
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    return None


def _cudnn_max_head_dim() -> int:
  # jax's check_is_flash_attention: 256 from Hopper (compute capability 9.0) on, else 128;
  # with no local GPU (a deviceless compile) jax's check finds no Hopper and allows 128.
  capability = getattr(_local_gpu(), "compute_capability", "0.0")
  return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def cudnn_attention_problem(backend: str, dtype: jnp.dtype, head_dim: int) -> str | None:
  """Why jax.nn.dot_product_attention(implementation="cudnn") cannot run with this
  backend, compute dtype and head size (jax 0.10's checks), or None if it can."""
  if backend != "gpu":
    return f"it needs an NVIDIA GPU, and the backend is {backend!r}"
  gpu = _local_gpu()  # None: a deviceless compile, for CUDA (the only targets shipped).
  if gpu is not None and "cuda" not in gpu.client.platform_version:
    return "it needs CUDA's cuDNN, and this GPU platform is not CUDA"
  if jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return f"it needs bfloat16 or float16 compute (config.model.dtype), not {jnp.dtype(dtype)}"
  max_head_dim = _cudnn_max_head_dim()
  if head_dim % 8 or head_dim > max_head_dim:
    return f"it needs a head size that is a multiple of 8 up to {max_head_dim}, not {head_dim}"
  return None


def attention_implementation(requested: str, backend: str, dtype: jnp.dtype, head_dim: int) -> str:
  """`config.model.attention` -> "xla" or "cudnn" for one attention shape; an explicit
  "cudnn" that cannot run raises, naming the key, instead of falling back."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.attention={requested!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    )
  if requested == "xla":
    return "xla"
  problem = cudnn_attention_problem(backend, dtype, head_dim)
  if problem and requested == "cudnn":
    raise ValueError(
      f"config.model.attention='cudnn': cuDNN flash attention cannot run here: {problem}. "
      "Use 'auto' (cuDNN where it can run, XLA elsewhere) or 'xla'."
    )
  return "xla" if problem else "cudnn"


def check_attention(
  requested: str,
  dtype: jnp.dtype,
  head_dims: Mapping[str, int],
  backend: str | None = None,
  attention_dropout: Mapping[str, float] | None = None,
) -> None:
  """Fails before compute if `config.model.attention` cannot serve every tower's heads
  ({tower: head size}); model builders call it with their resolved compute dtype.

  `attention_dropout` ({tower: config.model.<tower>.attention_dropout}): jax's cuDNN
  kernel takes no dropout, so an explicit "cudnn" with a rate above 0 is refused."""
  backend = backend or target_platform()
  for tower, head_dim in head_dims.items():
    try:
      attention_implementation(requested, backend, dtype, head_dim)
    except ValueError as error:
      raise ValueError(f"{error} (the {tower} tower's heads)") from None
  for tower, rate in (attention_dropout or {}).items():
    if rate and requested == "cudnn":
      raise ValueError(
        f"config.model.attention='cudnn' with config.model.{tower}.attention_dropout={rate}: "
        "jax's cuDNN attention has no dropout; use 'auto' (XLA wherever dropout runs)"
      )


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  implementation: str = "auto",
  *,
  is_causal: bool = False,
  padding_mask: jax.Array | None = None,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention of q (B, T, N, H) over k, v (B, S, N, H), logits and softmax in
  float32, through jax.nn.dot_product_attention with `implementation` (a
  config.model.attention value) resolved for this backend, dtype and head size.

  padding_mask (B, S) is true at the keys that may be attended to. XLA applies it as a
  mask; cuDNN takes it as key lengths (its fused kernel's padding form), which assumes
  the padding is trailing, as every tokenizer here pads.

  With `dropout_rng` (`attention_dropout_rng`), the attention probabilities are dropped
  at `dropout_rate` (BERT's attention_probs_dropout_prob): the heads-major path on every
  backend, since neither of jax's kernels takes dropout.
  """
  dropping = dropout_rng is not None and dropout_rate > 0
  platform = target_platform()  # The ambient mesh's at trace time, not the host's.
  chosen = attention_implementation(implementation, platform, q.dtype, q.shape[-1])
  if dropping and implementation == "cudnn":
    raise ValueError("config.model.attention='cudnn' cannot drop attention probabilities")
  # Keep the batch split over the batch axes and the heads whole: an FSDP-split in_proj
  # would otherwise hand its layout to the heads (12 do not split over 8 devices).
  q, k, v = (sharding.constrain_batch(t, tensor_dim=2) for t in (q, k, v))
  if dropping:
    out = _heads_major_attention(q, k, v, is_causal, padding_mask, dropout_rate, dropout_rng)
  elif chosen == "cudnn":
    out = _cudnn_attention(q, k, v, is_causal, padding_mask)
  elif platform == "cpu":
    out = _heads_major_attention(q, k, v, is_causal, padding_mask)
  else:
    mask = None if padding_mask is None else padding_mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  return sharding.constrain_batch(out, tensor_dim=2)


def _cudnn_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool, padding_mask: jax.Array | None
) -> jax.Array:
  """cuDNN flash attention at any length. jax 0.10 refuses cuDNN's training kernels at an
  odd query or key length (its check counts every call as biased: "Unsupported sequence
  length Q 197, KV 197", ViT-B/16's 197 tokens); such a length gets one more token,
  masked out as a key (cuDNN's key lengths) and cut from the output. Preferred to XLA's
  attention at 197 tokens by the compiled H100 step (benchmarks/preflight_gpu.py)."""
  queries, keys = q.shape[1], k.shape[1]
  lengths = None
  if padding_mask is not None:
    lengths = jnp.sum(padding_mask, axis=-1, dtype=jnp.int32)
  if keys % 2:
    if lengths is None:
      lengths = jnp.full((k.shape[0],), keys, jnp.int32)
    k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (k, v))
  if queries % 2:
    q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
  out = jax.nn.dot_product_attention(
    q, k, v, is_causal=is_causal, key_value_seq_lengths=lengths, implementation="cudnn"
  )
  return out[:, :queries]


def _heads_major_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  is_causal: bool,
  padding_mask: jax.Array | None,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """jax.nn.dot_product_attention's XLA math with the heads moved ahead of the tokens
  (B, N, T, H) first: XLA's CPU dots then run on contiguous per-head matrices, ~1.3x
  faster forward + backward at ViT-B/16's shape than the (B, T, N, H) einsums."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  allowed = None
  if padding_mask is not None:
    allowed = padding_mask[:, None, None, :]
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
    allowed = causal if allowed is None else allowed & causal
  if dropout_rng is None or not dropout_rate:
    return jnp.swapaxes(_softmax_attention(q, k, v, allowed), 1, 2)
  out = _dropout_softmax_attention(dropout_rate, q, k, v, allowed, dropout_rng)
  return jnp.swapaxes(out, 1, 2)


def _attention_weights(q: jax.Array, k: jax.Array, allowed: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(H)) over the allowed keys, in float32."""
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


# Autodiff of the math above keeps ~4 (T, S) arrays per layer for the backward pass (logits,
# masked logits, exponentials, weights); this keeps the weights alone: VLC's unmasked
# B/16 step at batch 8 needs 24 GB instead of 33 GB on CPU (XLA memory analysis); alone,
# attention forward + backward timed no slower.
@jax.custom_vjp
def _softmax_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None
) -> jax.Array:
  return _softmax_attention_fwd(q, k, v, allowed)[0]


def _softmax_attention_fwd(
  q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  weights = _attention_weights(q, k, allowed)
  out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.astype(v.dtype)
  return out, (q, k, v, weights, out)


def _softmax_attention_bwd(
  residuals: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
  q, k, v, weights, out = residuals
  f32 = jnp.float32
  d_v = jnp.matmul(
    jnp.swapaxes(weights, -1, -2).astype(d_out.dtype), d_out, preferred_element_type=f32
  )
  d_weights = jnp.matmul(d_out, jnp.swapaxes(v, -1, -2), preferred_element_type=f32)
  # Softmax backward: w * (dw - sum(w * dw)), where sum(w * dw) = sum(out * d_out).
  row_dot = jnp.sum(out.astype(f32) * d_out.astype(f32), axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row_dot) * q.shape[-1] ** -0.5).astype(q.dtype)
  d_q = jnp.matmul(d_logits, k, preferred_element_type=f32)
  d_k = jnp.matmul(jnp.swapaxes(d_logits, -1, -2), q, preferred_element_type=f32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _dropout_softmax_attention(
  rate: float, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None, key: jax.Array
) -> jax.Array:
  """The attention above with its probabilities dropped (inverted dropout), by autodiff:
  a custom VJP that redraws the mask in the backward pass measured more memory, not less
  (XLA's peak for 8 BERT layers at batch 32 x 64 tokens: 536 MiB against 520 MiB)."""
  weights = _attention_weights(q, k, allowed)
  kept = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
  dropped = jnp.where(kept, weights / (1.0 - rate), 0.0)
  out = jnp.matmul(dropped.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(v.dtype)

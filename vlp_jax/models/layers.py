"""Transformer building blocks shared by the image and text towers.

Parameter names follow open_clip's state dict (ln_1, attn.in_proj, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj, resblocks_<i>) so checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax import sharding

# torch.nn.LayerNorm's default; flax's is 1e-6. Needed for parity with open_clip.
LAYER_NORM_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "quick_gelu": quick_gelu,
}


def layer_norm(name: str, dtype: jnp.dtype, eps: float = LAYER_NORM_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Parameter-efficient additions to every transformer block (config.peft).

  adapter_reduction > 0 adds LilT's bottleneck adapters x + up(gelu(down(x))) of width
  width // adapter_reduction; lora_rank > 0 adds a low-rank update (alpha / rank) * x A B to
  the Dense layers named in lora_targets (empty: all of them). Both start as the identity
  (up and B are zero-initialised), so a pretrained tower's outputs are unchanged at step 0.
  """

  adapter_reduction: int = 0
  lora_rank: int = 0
  lora_alpha: float = 32.0
  lora_targets: tuple[str, ...] = ()

  def lora_rank_for(self, name: str) -> int:
    return self.lora_rank if not self.lora_targets or name in self.lora_targets else 0


NO_TUNING = Tuning()


def _symmetric_uniform(bound: float) -> Callable:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Dense(nn.Module):
  """nn.Dense's parameters (kernel, bias) plus an optional LoRA pair (lora_a, lora_b)."""

  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  use_bias: bool = True
  lora_rank: int = 0
  lora_alpha: float = 32.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    fan_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features))
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    if self.lora_rank:
      # A as torch's default Linear init (PEFT's choice), B zero: no change at step 0.
      a = self.param("lora_a", _symmetric_uniform(fan_in**-0.5), (fan_in, self.lora_rank))
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features))
      scale = self.lora_alpha / self.lora_rank
      y = y + jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype)) * scale
    return y


def dense(
  features: int, name: str, tuning: Tuning, dtype: jnp.dtype, **kwargs: Callable | bool
) -> Dense:
  """A Dense layer named `name`, with LoRA when `tuning` targets that name."""
  return Dense(
    features,
    lora_rank=tuning.lora_rank_for(name),
    lora_alpha=tuning.lora_alpha,
    dtype=dtype,
    name=name,
    **kwargs,
  )


class Adapter(nn.Module):
  """LilT's bottleneck adapter x + up(gelu(down(x))); `up` starts at zero (identity)."""

  reduction: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.reduction:
      raise ValueError(f"width {width} is not divisible by adapter_reduction {self.reduction}")
    h = nn.Dense(
      width // self.reduction,
      dtype=self.dtype,
      kernel_init=nn.initializers.normal(1e-3),
      name="down",
    )(x)
    h = nn.gelu(h, approximate=False)
    return x + nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="up")(h)


def maybe_adapter(x: jax.Array, name: str, tuning: Tuning, dtype: jnp.dtype) -> jax.Array:
  if not tuning.adapter_reduction:
    return x
  return Adapter(tuning.adapter_reduction, dtype, name=name)(x)


def apply_dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of `x` at `rate` inside `module`, where the caller of `apply` passed a
  "dropout" rng (training steps); the identity at rate 0 and without that rng (init,
  evaluation, prediction), so every eval path is deterministic without a flag."""
  if not rate or not module.has_rng("dropout"):
    return x
  return nn.Dropout(rate, deterministic=False)(x)


def attention_dropout_rng(module: nn.Module, rate: float) -> jax.Array | None:
  """The key for attention-probability dropout at `rate` in `module` (see `dropout`), or
  None where there is none to do."""
  if not rate or not module.has_rng("dropout"):
    return None
  return module.make_rng("dropout")


# config.model.attention: "auto" takes cuDNN flash attention where it can run, XLA's
# attention elsewhere; "cudnn" insists (and fails before compute where it cannot run).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# config.model.dtype "auto": bfloat16 compute where the matmul units are made for it.
_BFLOAT16_BACKENDS = ("gpu", "tpu")


def target_platform(mesh: Mesh | None = None) -> str:
  """The platform ("cpu", "gpu", "tpu") a program is built for: that of `mesh`'s devices,
  else of the ambient mesh (the train step is traced under its mesh, trainer.compile_step),
  else of this process's default devices. Never the host's backend when a mesh is given:
  a step compiled on a CPU host for a TPU topology (vlp_jax.preflight) is a TPU program."""
  if mesh is not None:
    return mesh.devices.flat[0].platform
  ambient = jax.sharding.get_abstract_mesh()
  if not ambient.empty and ambient.abstract_device is not None:
    return ambient.abstract_device.platform
  return jax.devices()[0].platform


def compute_dtype(name: str, backend: str | None = None) -> jnp.dtype:
  """`config.model.dtype` -> the compute dtype: "auto" is bfloat16 on `backend` "gpu" or
  "tpu" (default: `target_platform()`; model builders pass their mesh's platform) and
  float32 elsewhere; other names as they say. Parameters stay float32 either way."""
  if name == "auto":
    backend = backend or target_platform()
    return jnp.dtype(jnp.bfloat16 if backend in _BFLOAT16_BACKENDS else jnp.float32)
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(
      f"config.model.dtype={name!r} is not 'auto' or a dtype name such as 'bfloat16'"
    ) from None


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


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (open_clip's in_proj)."""

  num_heads: int
  causal: bool = False
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  attention: str = "auto"  # config.model.attention: "auto", "xla" or "cudnn".
  dropout: float = 0.0  # After the output projection (timm's proj_drop).
  attention_dropout: float = 0.0  # On the attention probabilities (timm's attn_drop).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    x = sharding.constrain_batch(x)
    qkv = dense(
      3 * width,
      "in_proj",
      self.tuning,
      self.dtype,
      kernel_init=nn.initializers.normal(width**-0.5),
    )(x)
    # Batch-split from the projection on: the FSDP-split in_proj is gathered instead.
    qkv = sharding.constrain_batch(qkv, tensor_dim=2)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    out = dot_product_attention(
      q,
      k,
      v,
      self.attention,
      is_causal=self.causal,
      dropout_rate=self.attention_dropout,
      dropout_rng=attention_dropout_rng(self, self.attention_dropout),
    )
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    out = dense(
      width, "out_proj", self.tuning, self.dtype, kernel_init=nn.initializers.normal(out_std)
    )(out.reshape(batch, length, width))
    return apply_dropout(self, out, self.dropout)


class Mlp(nn.Module):
  hidden_dim: int
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  dropout: float = 0.0  # After the activation and after c_proj (timm's Mlp drop).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = dense(
      self.hidden_dim,
      "c_fc",
      self.tuning,
      self.dtype,
      kernel_init=nn.initializers.normal((2 * width) ** -0.5),
    )(x)
    h = apply_dropout(self, ACTIVATIONS[self.activation](h), self.dropout)
    out_std = self.out_init_std if self.out_init_std is not None else width**-0.5
    h = dense(
      width, "c_proj", self.tuning, self.dtype, kernel_init=nn.initializers.normal(out_std)
    )(h)
    return apply_dropout(self, h, self.dropout)


class ResidualBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)).

  With adapters (LilT), each sub-layer's input first passes its adapter.
  """

  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  out_init_std: float | None = None
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  layer_norm_eps: float = LAYER_NORM_EPS  # timm's ViTs: 1e-6.
  attention: str = "auto"  # config.model.attention.
  dropout: float = 0.0  # timm's drop_rate: attention output and MLP (config.model.<tower>).
  attention_dropout: float = 0.0  # timm's attn_drop_rate: attention probabilities.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = maybe_adapter(x, "adapter_attn", self.tuning, self.dtype)
    x = x + Attention(
      self.num_heads,
      self.causal,
      self.out_init_std,
      self.dtype,
      self.tuning,
      attention=self.attention,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      name="attn",
    )(layer_norm("ln_1", self.dtype, self.layer_norm_eps)(x))
    x = maybe_adapter(x, "adapter_mlp", self.tuning, self.dtype)
    x = x + Mlp(
      self.mlp_dim,
      self.activation,
      self.out_init_std,
      self.dtype,
      self.tuning,
      dropout=self.dropout,
      name="mlp",
    )(layer_norm("ln_2", self.dtype, self.layer_norm_eps)(x))
    return x


# Activation rematerialisation policies (config.model.remat): what the backward pass keeps.
REMAT_POLICIES = {
  "none": None,  # Keep every activation: fastest, most memory.
  "full": jax.checkpoint_policies.nothing_saveable,  # Recompute each block: least memory.
  # Keep matmul outputs, recompute the cheap elementwise ops (softmax, gelu, layer norm).
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def refuse_scan_layers(scan_layers: bool, towers: str) -> None:
  """Fails before compute where `config.model.scan_layers` asks for a stacked layout that
  `towers` do not have (their blocks differ per depth or their importers map per block)."""
  if scan_layers:
    raise ValueError(
      f"config.model.scan_layers=True: {towers} have no scanned layout; set it to False "
      "(scanning serves the CLIP-style ViT and text towers)"
    )


def remat_policy_name(remat: bool | str) -> str:
  """Normalises `config.model.remat` (a policy name; True/False mean "full"/"none")."""
  name = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={remat!r} is not one of {tuple(REMAT_POLICIES)}")
  return name


def with_remat(
  block_cls: type[nn.Module], remat: bool | str, prevent_cse: bool = True
) -> type[nn.Module]:
  """`block_cls`, rematerialised under the `config.model.remat` policy (unless "none").

  Inside a scan, `prevent_cse=False`: the scan already keeps XLA from merging the
  recomputation into the forward pass, and the extra barriers would only slow it.
  """
  policy = remat_policy_name(remat)
  if policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


# The scanned layout's name for the stacked blocks, and the unrolled layout's block names.
STACKED_BLOCKS = "resblocks"
_UNROLLED_BLOCK = re.compile(rf"^{STACKED_BLOCKS}_(\d+)$")


class Transformer(nn.Module):
  """A stack of residual blocks with optional rematerialisation.

  Unrolled (the default, and the layout of weight import/export): blocks named
  resblocks_<i>. With `scan_layers`, one `nn.scan` over a single block whose parameters
  are stacked under "resblocks" (leading axis = depth): XLA compiles one block instead of
  `depth`, so compile time stops growing with depth. `stack_blocks` / `unstack_blocks`
  convert parameter trees between the two layouts.
  """

  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = "gelu"
  remat: bool | str = "none"
  dtype: jnp.dtype = jnp.float32
  tuning: Tuning = NO_TUNING
  layer_norm_eps: float = LAYER_NORM_EPS
  scan_layers: bool = False  # config.model.scan_layers
  attention: str = "auto"  # config.model.attention.
  dropout: float = 0.0  # ResidualBlock.dropout.
  attention_dropout: float = 0.0  # ResidualBlock.attention_dropout.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    # open_clip's residual-branch output scale: shrink with depth for stable early training.
    out_std = width**-0.5 * (2 * self.depth) ** -0.5
    block_args = dict(
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      causal=self.causal,
      activation=self.activation,
      out_init_std=out_std,
      dtype=self.dtype,
      tuning=self.tuning,
      layer_norm_eps=self.layer_norm_eps,
      attention=self.attention,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
    )
    if self.scan_layers:
      block = with_remat(ResidualBlock, self.remat, prevent_cse=False)(
        **block_args, name=STACKED_BLOCKS
      )
      scan = nn.scan(
        lambda module, carry, _: (module(carry), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # Each block its own masks.
        length=self.depth,
      )
      return scan(block, x, None)[0]
    block_cls = with_remat(ResidualBlock, self.remat)
    for i in range(self.depth):
      x = block_cls(**block_args, name=f"{STACKED_BLOCKS}_{i}")(x)
    return x


# ---------------------------------------------------------------- parameter layouts


def _is_unrolled_parent(node: Any) -> bool:
  return isinstance(node, Mapping) and any(_UNROLLED_BLOCK.match(str(k)) for k in node)


def _is_stacked_parent(node: Any) -> bool:
  return isinstance(node, Mapping) and STACKED_BLOCKS in node


def has_stacked_blocks(tree: Any) -> bool:
  """Whether `tree` (parameters, a train state...) holds scanned-layout blocks."""
  found = []
  jax.tree_util.tree_map(
    lambda node: found.append(_is_stacked_parent(node)), tree, is_leaf=_is_stacked_parent
  )
  return any(found)


def _stacked_sharding(sharding: Any, add: bool) -> Any:
  """A NamedSharding with the layer axis added (replicated: the scan slices it) or
  removed; other shardings (one device) fit either layout."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, PartitionSpec(*((None, *spec) if add else spec[1:])))


def _stack_leaves(*leaves: Any) -> Any:
  first = leaves[0]
  if hasattr(first, "shape") and any(leaf.shape != first.shape for leaf in leaves):
    raise ValueError(f"blocks have shapes {sorted({leaf.shape for leaf in leaves})}: not stackable")
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(
      (len(leaves), *first.shape), first.dtype, sharding=_stacked_sharding(first.sharding, True)
    )
  if isinstance(first, np.ndarray | np.generic):
    return np.stack(leaves)
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  if any(leaf != first for leaf in leaves):  # Labels (peft, optimizer groups) and the like.
    raise ValueError(f"blocks differ ({sorted(set(map(str, leaves)))}): they cannot be stacked")
  return first


def _unstack_leaf(leaf: Any, depth: int) -> list[Any]:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = _stacked_sharding(leaf.sharding, False)
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)] * depth
  if isinstance(leaf, np.ndarray | jax.Array):
    return [leaf[i] for i in range(depth)]
  return [leaf] * depth


def _stack_node(node: Any) -> Any:
  if not _is_unrolled_parent(node):
    return node
  blocks = sorted((int(m.group(1)), k) for k in node if (m := _UNROLLED_BLOCK.match(str(k))))
  if [i for i, _ in blocks] != list(range(len(blocks))):
    raise ValueError(f"blocks {[k for _, k in blocks]} are not numbered 0..{len(blocks) - 1}")
  out = {k: v for k, v in node.items() if not _UNROLLED_BLOCK.match(str(k))}
  out[STACKED_BLOCKS] = jax.tree.map(_stack_leaves, *(node[k] for _, k in blocks))
  return type(node)(out) if not isinstance(node, dict) else out


def _unstack_node(node: Any) -> Any:
  if not _is_stacked_parent(node):
    return node
  stacked = node[STACKED_BLOCKS]
  depths = {leaf.shape[0] for leaf in jax.tree.leaves(stacked) if hasattr(leaf, "shape")}
  if len(depths) != 1:
    raise ValueError(f"stacked blocks have leading axes {sorted(depths)}, not one depth")
  (depth,) = depths
  leaves, treedef = jax.tree.flatten(stacked)
  columns = [_unstack_leaf(leaf, depth) for leaf in leaves]
  out = {k: v for k, v in node.items() if k != STACKED_BLOCKS}
  for i in range(depth):
    out[f"{STACKED_BLOCKS}_{i}"] = jax.tree.unflatten(treedef, [c[i] for c in columns])
  return type(node)(out) if not isinstance(node, dict) else out


def stack_blocks(tree: Any) -> Any:
  """Unrolled layout (resblocks_0..N-1) -> scanned layout (one "resblocks" subtree whose
  leaves have a leading axis N), wherever blocks appear in `tree`: parameters, optimizer
  moments, a whole train state, labels, or their ShapeDtypeStructs (shardings get a
  replicated layer axis). A tree already scanned is returned as it is."""
  return jax.tree_util.tree_map(_stack_node, tree, is_leaf=_is_unrolled_parent)


def unstack_blocks(tree: Any) -> Any:
  """The inverse of `stack_blocks`: scanned layout -> resblocks_<i> (exact: slices)."""
  return jax.tree_util.tree_map(_unstack_node, tree, is_leaf=_is_stacked_parent)

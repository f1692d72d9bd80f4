"""ALBEF pretraining (Li et al., 2021): image-text contrast (ITA) with a momentum model
and feature queues, image-text matching (ITM) on hard negatives, and masked language
modelling (MLM) through the fusion layers, both distilled from the momentum model.

One step, as the reference code orders it:
  EMA update of the momentum encoders (before they run) -> online image tokens / feature
  and text-only states / feature -> momentum features -> ITA over batch + queue with soft
  targets alpha * softmax(momentum logits) + (1 - alpha) * one-hot -> ITM on [positive;
  hard negative image per text; hard negative text per image] -> MLM: `select_mlm`
  chooses the tokens, online and momentum models read the masked caption with their image
  tokens, `mlm_feedback` sees the result -> enqueue the momentum features of the global
  batch.
Dropout (config.model.text.dropout / attention_dropout: ALBEF's BERT 0.1 each) runs in
every encoder and fusion pass of the step, the momentum model's too (ALBEF's momentum
encoders run in training mode), each pass with its own key; evaluation runs none.

Differences from the reference code, all deliberate:
- Hard negatives are drawn from the GLOBAL batch (ALBEF draws within each GPU's batch),
  and a caption identical to the row's own is never drawn as its negative.
- Queue rows not yet written are left out of the softmax (ALBEF starts the queues with
  random unit vectors).
- The temperature clamp is a straight-through clamp in the forward pass (ALBEF clamps
  the parameter in place before each step).

Subclasses (CMask) choose the MLM tokens by overriding `select_mlm` and learn from the
outcome in `mlm_feedback`; `init` and `param_labels` / `optimizer_groups` add their own
parameters (params["agent"]) and optimizer group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections

from vlp_jax import losses, pretrained
from vlp_jax.config_lib import ConfigBlock, at_least, each, in_range, positive
from vlp_jax.masking import text as text_masking
from vlp_jax.methods import buffers
from vlp_jax.methods.albef_parts import (
  Encoded,
  MlmChoice,
  MlmPass,
  alpha_at,
  draw_negatives,
  ita_loss,
  itm_and_mlm,
  predict_fns,
)
from vlp_jax.methods.base import (
  Batch,
  Extra,
  Method,
  MethodContext,
  Metrics,
  Params,
  PredictFn,
  dropout_rngs,
)
from vlp_jax.models.albef import MOMENTUM_PARTS, AlbefModel, create_albef_model


@dataclasses.dataclass(frozen=True)
class Albef(Method):
  """ALBEF's three losses over a momentum model and feature queues.

  params = {"model": AlbefModel params}; extra = {"ema": momentum copies of
  MOMENTUM_PARTS, "image_queue", "text_queue": FeatureQueue of momentum features}.
  """

  model: AlbefModel
  specials: text_masking.TextSpecials
  context_length: int
  momentum: float = 0.995
  queue_size: int = 65_536
  queue_warmup_steps: int = 0  # Steps of ITA over the batch alone, the queue left out.
  alpha: float = 0.4
  alpha_ramp_steps: int = 0  # 0: alpha from step 0.
  mlm_probability: float = 0.15
  mlm_replace: tuple[float, float, float] = (0.8, 0.1, 0.1)
  ita_weight: float = 1.0
  itm_weight: float = 1.0
  mlm_weight: float = 1.0
  init_specs: tuple[pretrained.InitSpec, ...] = ()
  report_name: str = "vlp_jax-ALBEF"
  name = "albef"

  # ------------------------------------------------------------ jitted

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.model.visual.image_size
    return {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
      "tokens": jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32),
    }

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    size = self.model.visual.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, self.context_length), jnp.int32)
    model_params = self.model.init(rng, images, tokens)["params"]
    dim = self.model.embed_dim
    extra = {
      # ALBEF's copy_params: the momentum model starts equal to the online one.
      "ema": jax.tree.map(jnp.copy, {k: model_params[k] for k in MOMENTUM_PARTS}),
      "image_queue": buffers.FeatureQueue.create(self.queue_size, dim),
      "text_queue": buffers.FeatureQueue.create(self.queue_size, dim),
    }
    return {"model": model_params}, extra

  def _apply(self, params: Params, *args: Any, method: Callable, rngs: dict | None = None) -> Any:
    """`method` of the model; `rngs` (base.dropout_rngs) switch dropout on."""
    return self.model.apply({"params": params}, *args, method=method, rngs=rngs)

  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    online = params["model"]
    tokens = batch["tokens"]
    mask = tokens != self.model.text.pad_id
    itm_rng, mlm_rng = jax.random.split(rng)
    alpha = alpha_at(step, self.alpha, self.alpha_ramp_steps)
    use_queue = jnp.asarray(step) >= self.queue_warmup_steps
    temperature = self._apply(online, method=AlbefModel.temperature)

    # The momentum model moves first, then runs (ALBEF's _momentum_update in no_grad).
    ema = buffers.ema_update(extra["ema"], {k: online[k] for k in MOMENTUM_PARTS}, self.momentum)
    momentum = jax.lax.stop_gradient({**online, **ema})
    enc = self._encode(params, extra, batch, rng, mlm_rng, step, momentum, mask)
    ita, ita_metrics, sim_i2t, sim_t2i = ita_loss(
      enc.image_feat,
      enc.text_feat,
      enc.image_feat_m,
      enc.text_feat_m,
      extra["image_queue"],
      extra["text_queue"],
      temperature,
      alpha,
      use_queue,
    )
    itm, itm_metrics, mlm = itm_and_mlm(
      self._apply,
      self.mlm_positions,
      self.draw_negatives,
      online,
      momentum,
      enc,
      tokens,
      mask,
      itm_rng,
      (sim_i2t, sim_t2i),
      rng,
      alpha,
    )
    new_extra = {
      **extra,
      "ema": ema,
      # The global batch in row order: the same queue however the batch is sharded.
      "image_queue": extra["image_queue"].enqueue(enc.image_feat_m),
      "text_queue": extra["text_queue"].enqueue(enc.text_feat_m),
    }
    aux_loss, feedback_metrics, new_extra = self.mlm_feedback(
      params, new_extra, batch, step, enc.choice, mlm
    )
    loss = self.ita_weight * ita + self.itm_weight * itm + self.mlm_weight * mlm.loss + aux_loss
    metrics = {
      "loss": loss,
      **ita_metrics,
      "itm_loss": itm,
      **itm_metrics,
      "mlm_loss": mlm.loss,
      "mlm_accuracy": mlm.accuracy,
      # Selected positions past mlm_capacity (left out of the loss; ~never for ALBEF).
      "mlm_dropped": jnp.sum(enc.choice.selected) - jnp.sum(mlm.predicted),
      "mlm_ratio": jnp.sum(enc.choice.selected) / jnp.maximum(jnp.sum(mask), 1),
      "temperature": temperature,
      "alpha": alpha,
      "queue_filled": extra["image_queue"].filled,
      "ita_uses_queue": use_queue.astype(jnp.float32),
      **feedback_metrics,
    }
    return loss, (metrics, new_extra)

  def _encode(
    self,
    params: Params,
    extra: Extra,
    batch: Batch,
    rng: jax.Array,
    mlm_rng: jax.Array,
    step: jax.Array,
    momentum: Params,
    mask: jax.Array,
  ) -> Encoded:
    """The unimodal passes: online image and caption, the MLM choice, and the momentum
    image, caption and masked caption (behind stop_gradient)."""
    online, images, tokens = params["model"], batch["image"], batch["tokens"]
    # Every pass runs dropout with a key of its own, the momentum ones too: ALBEF's
    # momentum encoders run in training mode (torch.no_grad keeps dropout on).
    image_tokens, image_feat = self._apply(
      online, images, method=AlbefModel.encode_image, rngs=dropout_rngs(rng, 0)
    )
    text_states, text_feat = self._apply(
      online, tokens, method=AlbefModel.encode_text, rngs=dropout_rngs(rng, 1)
    )
    choice = self.select_mlm(
      params,
      extra,
      batch,
      mlm_rng,
      step,
      jax.lax.stop_gradient(text_states),
      jax.lax.stop_gradient(image_tokens),
    )
    # Momentum passes: the caption and the masked caption through the text-only layers
    # at once (one program of twice the rows compiles and runs faster than two).
    image_tokens_m, image_feat_m = self._apply(
      momentum, images, method=AlbefModel.encode_image, rngs=dropout_rngs(rng, 2)
    )
    both = jnp.concatenate([tokens, choice.inputs])
    states_m, text_feat_m = self._apply(
      momentum,
      both,
      jnp.concatenate([mask, mask]),
      method=AlbefModel.encode_text,
      rngs=dropout_rngs(rng, 3),
    )
    rows = tokens.shape[0]
    momentum_outputs = jax.lax.stop_gradient(
      (image_tokens_m, image_feat_m, text_feat_m[:rows], states_m[rows:])
    )
    return Encoded(image_tokens, image_feat, text_states, text_feat, choice, *momentum_outputs)

  def draw_negatives(
    self, rng: jax.Array, tokens: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """(hard negative image per text, hard negative text per image), (B,) each: ALBEF's
    draw (albef_parts.draw_negatives); a subclass may fix them (tests)."""
    return draw_negatives(rng, tokens, sim_i2t, sim_t2i)

  def mlm_capacity(self, rows: int, length: int) -> int:
    """The static number of positions the MLM head computes for a (rows, length) batch:
    ALBEF's Bernoulli count (at most rows x length x mlm_probability on average) plus six
    standard deviations, so it practically never binds (at 8 x 30, 70 positions: the
    binomial tail is 1.7e-8 per step; it shrinks as batches grow). Past it, the selected positions stay
    masked in the input but are not predicted (as BERT's max_predictions_per_seq); the
    `mlm_dropped` metric counts them."""
    n, p = rows * length, self.mlm_probability
    return max(1, min(n, math.ceil(n * p + 6 * math.sqrt(n * p * (1 - p)))))

  def mlm_positions(self, selected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positions (K,) into the flattened (B x T) batch, kept (K,) bool) for the
    `mlm_capacity` static K: the selected positions in row-major order, then padding."""
    return losses.masked_positions(selected, self.mlm_capacity(*selected.shape))

  # ---------------------------------------------------------------- hooks (CMask)

  def select_mlm(
    self,
    params: Params,
    extra: Extra,
    batch: Batch,
    rng: jax.Array,
    step: jax.Array,
    text_states: jax.Array,
    image_tokens: jax.Array,
  ) -> MlmChoice:
    """The tokens to mask. ALBEF: each token but pad and [CLS] with probability
    mlm_probability, replaced 80/10/10 by [MASK] / a random id / itself.

    `text_states` (B, T, W) are the online model's text-only states of the unmasked
    caption and `image_tokens` (B, N, Wi) its image tokens, both behind stop_gradient:
    what a masking agent looks at."""
    del params, extra, step, text_states, image_tokens
    inputs, selected = text_masking.mask_text(
      rng, batch["tokens"], self.specials, self.mlm_probability, probs=self.mlm_replace
    )
    return MlmChoice(inputs, selected)

  def mlm_feedback(
    self,
    params: Params,
    extra: Extra,
    batch: Batch,
    step: jax.Array,
    choice: MlmChoice,
    mlm: MlmPass,
  ) -> tuple[jax.Array, Metrics, Extra]:
    """After the MLM pass: (a loss added to the total, metrics, the next extra state).
    ALBEF: nothing. A masking agent computes its reward from `mlm.flows` here."""
    del params, batch, step, choice, mlm
    return jnp.zeros((), jnp.float32), {}, extra

  # ---------------------------------------------------------------- evaluation

  def predict_fns(self) -> dict[str, PredictFn]:
    """ITA embeddings and the ITM pair score (albef_parts.predict_fns)."""
    return predict_fns(self.model)

  # ------------------------------------------------------------ host

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    if not self.init_specs:
      return None
    params = gather()
    return {**params, "model": pretrained.load(list(self.init_specs), params["model"])}

  @property
  def model_name(self) -> str:
    return self.report_name


def _epoch_steps(ctx: MethodContext) -> int:
  """Steps in one epoch of the training sets (the run's length where none are given)."""
  if not ctx.train_sets:
    return ctx.total_steps
  records = sum(len(grain.sources.ArrayRecordDataSource(list(s.shards))) for s in ctx.train_sets)
  return max(1, records // ctx.config.batch_size)


def check_config(ctx: MethodContext) -> None:
  """ValueError naming a config key ALBEF cannot honour."""
  config = ctx.config
  if config.batch_size <= 0 or config.albef.queue_size % config.batch_size:
    raise ValueError(
      f"config.albef.queue_size={config.albef.queue_size} must be a multiple of "
      f"config.batch_size={config.batch_size} (each step enqueues the global batch)"
    )
  if config.masking.kind != "none":
    raise ValueError(f"config.masking.kind={config.masking.kind!r}: ALBEF masks no patches")
  if config.grad_accum_steps != 1:
    raise ValueError("config.grad_accum_steps: ALBEF's queues and negatives need 1")
  if config.peft.preset != "all" or config.peft.image or config.peft.text:
    raise ValueError("config.peft: ALBEF trains every parameter (preset 'all')")
  if config.model.init:
    raise ValueError(
      "config.model.init: ALBEF loads towers (config.model.image.init, "
      "config.model.text.init=hf_bert:DIR) or a run (config.init_from)"
    )
  if sum(config.albef.mlm_replace) > 1 + 1e-6:
    raise ValueError(f"config.albef.mlm_replace={config.albef.mlm_replace} sums to more than 1")


def create(ctx: MethodContext, **overrides: Any) -> Albef:
  """The method from config.model and config.albef (ValueError naming a bad key).

  `overrides` replace fields (a subclass, e.g. CMask, passes cls= and its own)."""
  config, albef = ctx.config, ctx.config.albef
  check_config(ctx)
  specials = text_masking.text_specials(ctx.tokenizer, ("pad_id", "cls_id"))
  model = create_albef_model(
    config.model, albef, ctx.tokenizer.vocab_size, ctx.tokenizer.pad_id, ctx.platform
  )
  specs = tuple(pretrained.parse_specs(config, check_paths=False))
  for spec in specs:
    if spec.kind == "text" and spec.source != "hf_bert":
      raise ValueError(f"{spec.key}: ALBEF's text encoder loads from hf_bert:<model dir>")
  image = config.model.image
  fields = dict(
    model=model,
    specials=specials,
    context_length=ctx.tokenizer.context_length,
    momentum=albef.momentum,
    queue_size=albef.queue_size,
    queue_warmup_steps=albef.queue_warmup_steps,
    alpha=albef.alpha,
    alpha_ramp_steps=albef.alpha_ramp_steps or _epoch_steps(ctx),
    mlm_probability=albef.mlm_probability,
    mlm_replace=tuple(albef.mlm_replace),
    ita_weight=albef.ita_weight,
    itm_weight=albef.itm_weight,
    mlm_weight=albef.mlm_weight,
    init_specs=specs,
    report_name=f"vlp_jax-ALBEF-ViT-{image.variant}-{image.image_size}px",
  )
  fields.update(overrides)
  cls = fields.pop("cls", Albef)
  return cls(**fields)


# ---------------------------------------------------------------- config.albef


def _config_defaults() -> ml_collections.ConfigDict:
  """config.albef (ALBEF's, and CMask's beneath its agent): ITA (momentum-distilled
  InfoNCE over batch + queue), ITM (hard negatives) and MLM (momentum-distilled). The text
  encoder is config.model.text (kind "bert"), its layers from fusion_layer on cross-attend
  to the image tokens; config.model.embed_dim is the ITA width (256)."""
  block = ml_collections.ConfigDict()
  block.fusion_layer = 6  # First text layer with cross-attention (BERT-base: 6 of 12).
  block.momentum = 0.995  # EMA of the momentum encoders, updated before they run.
  # Momentum features kept per modality (ALBEF: 65,536); a multiple of batch_size.
  block.queue_size = 65_536
  # Steps during which ITA contrasts the batch alone (the queues still fill). 0, as ALBEF,
  # whose towers start pretrained; from random init the towers' features are nearly one
  # vector, and stale queue rows let ITA fall by drifting the batch away from them
  # instead of telling its pairs apart (configs/demo.py's ALBEF never learned ITA).
  block.queue_warmup_steps = 0
  block.alpha = 0.4  # Weight of the momentum model's soft targets (ITA and MLM).
  # alpha rises linearly from 0 over these steps; 0: one epoch of config.data.train.
  block.alpha_ramp_steps = 0
  block.temperature = 0.07  # Initial ITA temperature (learned, clamped below).
  block.temperature_min = 0.001
  block.temperature_max = 0.5
  block.mlm_probability = 0.15  # Share of tokens (not pad, [CLS]) masked for MLM.
  # How a masked token is replaced: [MASK], a random id, unchanged (BERT's 80/10/10).
  block.mlm_replace = (0.8, 0.1, 0.1)
  block.ita_weight = 1.0  # Loss weights (ALBEF: all equal).
  block.itm_weight = 1.0
  block.mlm_weight = 1.0
  return block


# The block a run of this method carries (vlp_jax.configs.common.base_config(method)) and
# the valid range of its numeric fields, checked before any compute.
CONFIG_BLOCK = ConfigBlock(
  "albef",
  _config_defaults,
  {
    "fusion_layer": at_least(0),  # <= model.text.depth: methods/albef.py.
    "momentum": in_range(0, 1),
    "queue_size": at_least(1),  # A multiple of batch_size: methods/albef.py.
    "queue_warmup_steps": at_least(0),
    "alpha": in_range(0, 1),
    "alpha_ramp_steps": at_least(0),  # 0: one epoch.
    "temperature": positive(),
    "temperature_min": positive(),
    "temperature_max": positive(),
    "mlm_probability": in_range(0, 1),
    "mlm_replace": each(in_range(0, 1), length=3),
    "ita_weight": at_least(0),
    "itm_weight": at_least(0),
    "mlm_weight": at_least(0),
  },
)

"""CMask (NAACL 2024): ALBEF whose MLM tokens are chosen by a masking agent, trained in
the same jitted step to pick the words whose reconstruction needs the image.

The released code never trains its agent; this builds the paper's intent
(shared/notes/methods.md section 3):
- Policy (models.agent.MaskingAgent): the online model's text-only states and image
  tokens (stop-gradient) through a few agent-owned cross-attention layers -> one logit
  per token; pad, [CLS] and [SEP] are never chosen.
- Masks: k = round(mask_ratio x caption length) tokens per caption, all replaced by
  [MASK]. The curriculum gives the agent round(share x k) of them (Gumbel-top-k, exact
  Plackett-Luce set log-probability) and draws the rest uniformly; the share ramps from
  0 to 1 over config.cmask.curriculum_steps (masking.curriculum.mix_masks).
- Reward per caption: the information flow from the image into the agent's masked tokens
  in the fusion layers (||sum_j A[i, j] W_V x_img_j||, averaged over tokens and layers),
  plus, when config.cmask.gain_weight > 0, the drop in MLM loss the image brings (a
  second, image-free fusion pass).
- REINFORCE with a running-mean baseline (extra["baseline"], checkpointed) and an
  entropy bonus; params["agent"] is its own optimizer group (Adam at
  config.cmask.agent_lr). The main model's losses never reach the agent and the
  agent's loss never reaches the main model: every agent input is behind stop_gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlp_jax.config_lib import ConfigBlock, at_least, in_range, positive
from vlp_jax.masking import curriculum
from vlp_jax.masking import text as text_masking
from vlp_jax.methods import albef
from vlp_jax.methods.albef import Albef
from vlp_jax.methods.albef_parts import MlmChoice, MlmPass, gather_rows, scatter_rows
from vlp_jax.methods.base import Batch, Extra, MethodContext, Metrics, Params, PredictFn
from vlp_jax.models.agent import MaskingAgent
from vlp_jax.models.albef import AlbefModel
from vlp_jax.models.platform import compute_dtype


@dataclasses.dataclass(frozen=True)
class CMask(Albef):
  """ALBEF with a learned, curriculum-scheduled choice of the MLM tokens."""

  agent: MaskingAgent = None  # type: ignore[assignment]
  never_mask: tuple[int, ...] = ()  # pad, [CLS], [SEP]: never chosen by agent or chance.
  mask_ratio: float = 0.3
  curriculum_steps: int = 0
  span: tuple[float, int] | None = None  # (geometric p, max length) or None: tokens.
  entropy_coef: float = 0.01
  baseline_momentum: float = 0.99
  gain_weight: float = 0.0  # Weight of the MLM-loss drop the image brings; 0: flow only.
  agent_weight: float = 1.0  # Weight of the REINFORCE loss in the total.
  agent_lr: float = 1e-4
  name = "cmask"

  # ------------------------------------------------------------ jitted

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    main_rng, agent_rng = jax.random.split(rng)
    params, extra = super().init(main_rng)
    size = self.model.visual.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, self.context_length), jnp.int32)
    image_tokens, _ = self._apply(params["model"], images, method=AlbefModel.encode_image)
    text_states, _ = self._apply(params["model"], tokens, method=AlbefModel.encode_text)
    mask = jnp.ones(tokens.shape, bool)
    agent_params = self.agent.init(agent_rng, text_states, image_tokens, mask, mask)["params"]
    return {**params, "agent": agent_params}, {**extra, "baseline": jnp.zeros((), jnp.float32)}

  def agent_logits(
    self, params: Params, tokens: jax.Array, text_states: jax.Array, image_tokens: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """(logits (B, T), valid (B, T)): the agent's score of every maskable token."""
    valid = text_masking.maskable(tokens, self.never_mask)
    mask = tokens != self.model.text.pad_id
    logits = self.agent.apply(
      {"params": params["agent"]},
      jax.lax.stop_gradient(text_states),
      jax.lax.stop_gradient(image_tokens),
      mask,
      valid,
    )
    return logits, valid

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
    del extra
    tokens = batch["tokens"]
    logits, valid = self.agent_logits(params, tokens, text_states, image_tokens)
    share = curriculum.agent_share(step, self.curriculum_steps)
    counts = curriculum.mask_counts(valid, self.mask_ratio)
    mixed = curriculum.mix_masks(rng, logits, valid, counts, share, self.span)
    # CMask replaces every chosen token by [MASK] (no 80/10/10).
    inputs = jnp.where(mixed.selected, self.specials.mask_id, tokens)
    aux = {
      "log_prob": mixed.log_prob,
      "agent_selected": mixed.agent_selected,
      "agent_count": mixed.agent_count,
      "entropy": curriculum.token_entropy(logits, valid),
      "share": share,
    }
    return MlmChoice(inputs, mixed.selected, aux)

  def mlm_feedback(
    self,
    params: Params,
    extra: Extra,
    batch: Batch,
    step: jax.Array,
    choice: MlmChoice,
    mlm: MlmPass,
  ) -> tuple[jax.Array, Metrics, Extra]:
    del step
    chosen = choice.aux["agent_selected"]
    reward = curriculum.flow_reward(jax.lax.stop_gradient(mlm.flows), chosen)
    metrics: Metrics = {}
    if self.gain_weight:
      gain = curriculum.mlm_gain(
        self._image_free_loss(params, batch, choice),
        _mean_over(jax.lax.stop_gradient(mlm.token_loss), chosen),
      )
      reward = reward + self.gain_weight * gain
      metrics["agent/mlm_gain"] = jnp.mean(gain)
    weight = choice.aux["agent_count"] > 0
    baseline = extra["baseline"]
    loss, agent_metrics = curriculum.reinforce_loss(
      choice.aux["log_prob"], reward, baseline, choice.aux["entropy"], self.entropy_coef, weight
    )
    new_baseline = curriculum.update_baseline(baseline, reward, self.baseline_momentum, weight)
    metrics.update(agent_metrics)
    metrics["agent/share"] = choice.aux["share"]
    metrics["agent/masked_per_caption"] = jnp.mean(choice.aux["agent_count"].astype(jnp.float32))
    return self.agent_weight * loss, metrics, {**extra, "baseline": new_baseline}

  def _image_free_loss(self, params: Params, batch: Batch, choice: MlmChoice) -> jax.Array:
    """(B,): each caption's MLM loss over the agent's tokens when the fusion layers see
    no image (zero image tokens): the baseline the image's help is measured against.
    Without dropout (no rng): the baseline's own noise would only add to the reward's."""
    online = jax.lax.stop_gradient(params["model"])
    tokens = batch["tokens"]
    mask = tokens != self.model.text.pad_id
    states, _ = self._apply(online, choice.inputs, mask, method=AlbefModel.encode_text)
    size = self.model.visual.image_size
    blank = jax.eval_shape(
      lambda: self._apply(
        online, jnp.zeros((1, size, size, 3), jnp.uint8), method=AlbefModel.encode_image
      )[0]
    )
    # One all-zero image every row attends to: its keys and values are computed once.
    no_image = jnp.zeros(blank.shape, blank.dtype)
    rows = tokens.shape[0]
    fused, _ = self._apply(
      online, states, mask, no_image, jnp.zeros((rows,), jnp.int32), method=AlbefModel.fuse
    )
    # The head only where the agent masked (its tokens are a subset of choice.selected,
    # which mlm_capacity always holds in full: exactly mask_counts per caption).
    chosen = choice.aux["agent_selected"]
    positions, kept = self.mlm_positions(chosen)
    logits = self._apply(online, gather_rows(fused, positions), method=AlbefModel.mlm_logits)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), gather_rows(tokens, positions)
    )
    return _mean_over(scatter_rows(token_loss, positions, kept, tokens.shape), chosen)

  def mlm_capacity(self, rows: int, length: int) -> int:
    """Every caption masks exactly round(mask_ratio x its maskable tokens) (at most
    `length` of them), so this bound is never exceeded."""
    per_row = math.floor(self.mask_ratio * length + 0.5)
    return max(1, min(rows * length, rows * per_row))

  def predict_fns(self) -> dict[str, PredictFn]:
    """ALBEF's, plus "agent_logits": (params, tokens, images) -> (B, T) the agent's
    scores of a caption's tokens (very negative at tokens it never masks)."""
    fns = super().predict_fns()
    model = self.model

    def agent_scores(params: Params, tokens: jax.Array, images: jax.Array) -> jax.Array:
      online = {"params": params["model"]}
      image_tokens, _ = model.apply(online, images, method=AlbefModel.encode_image)
      text_states, _ = model.apply(online, tokens, method=AlbefModel.encode_text)
      return self.agent_logits(params, tokens, text_states, image_tokens)[0]

    return {**fns, "agent_logits": agent_scores}

  # ------------------------------------------------------------ host

  def param_labels(self) -> Callable[[Params], Any] | None:
    def labels(params: Params) -> Any:
      return {
        **jax.tree.map(lambda _: "train", {k: v for k, v in params.items() if k != "agent"}),
        "agent": jax.tree.map(lambda _: "agent", params["agent"]),
      }

    return labels

  def optimizer_groups(self, schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
    del schedule  # The agent learns at its own constant rate from the first step.
    return {"agent": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(self.agent_lr))}


def _mean_over(values: jax.Array, where: jax.Array) -> jax.Array:
  """(B,): the mean of values (B, T) over the `where` positions of each row (0: none)."""
  total = jnp.sum(jnp.where(where, values, 0.0), axis=-1)
  return total / jnp.maximum(jnp.sum(where, axis=-1), 1)


def create(ctx: MethodContext) -> CMask:
  """ALBEF from config.albef plus the agent and curriculum of config.cmask."""
  cmask = ctx.config.cmask
  if cmask.span_max_length and not 0 < cmask.span_p <= 1:
    raise ValueError(f"config.cmask.span_p={cmask.span_p} must be in (0, 1]")
  text = ctx.config.model.text
  agent = MaskingAgent(
    num_layers=cmask.agent_layers,
    num_heads=cmask.agent_heads or text.num_heads,
    mlp_dim=cmask.agent_mlp_dim or text.mlp_dim,
    width=cmask.agent_width or None,
    dtype=compute_dtype(ctx.config.model.dtype, ctx.platform),
  )
  tokenizer = ctx.tokenizer
  never_mask = text_masking.text_specials(tokenizer, ("pad_id", "cls_id", "sep_id")).never_mask
  return albef.create(
    ctx,
    cls=CMask,
    agent=agent,
    never_mask=never_mask,
    mask_ratio=cmask.mask_ratio,
    curriculum_steps=cmask.curriculum_steps,
    span=(cmask.span_p, cmask.span_max_length) if cmask.span_max_length else None,
    entropy_coef=cmask.entropy_coef,
    baseline_momentum=cmask.baseline_momentum,
    gain_weight=cmask.gain_weight,
    agent_weight=cmask.agent_weight,
    agent_lr=cmask.agent_lr,
    report_name=f"vlp_jax-CMask-ViT-{ctx.config.model.image.variant}",
  )


# ---------------------------------------------------------------- config.cmask


def _config_defaults() -> ml_collections.ConfigDict:
  """config.cmask: ALBEF (config.albef) whose MLM tokens a masking agent picks, trained in
  the same step with REINFORCE on the information flow from the image into the tokens it
  masks."""
  block = ml_collections.ConfigDict()
  block.mask_ratio = 0.3  # Tokens masked per caption: round(ratio x length).
  # The agent's share of each caption's masks rises linearly from 0 (random masking) to 1
  # over these steps; 0: the agent from the first step.
  block.curriculum_steps = 10_000
  block.agent_layers = 2  # Agent-owned cross-attention layers.
  block.agent_width = 0  # Their width; 0: the text encoder's.
  block.agent_heads = 0  # 0: the text encoder's.
  block.agent_mlp_dim = 0  # 0: the text encoder's.
  block.agent_lr = 1e-4  # Adam, constant, clipped at global norm 1.
  block.agent_weight = 1.0  # Weight of the REINFORCE loss in the total.
  block.entropy_coef = 0.01  # Entropy bonus of the agent's token softmax.
  block.baseline_momentum = 0.99  # Running-mean reward baseline.
  # Reward = flow + gain_weight x the MLM-loss drop the image brings (a second,
  # image-free fusion pass); 0: flow only.
  block.gain_weight = 0.0
  # Span masking: the agent picks span starts, each grown right by a geometric length
  # (SpanBERT: p 0.2, at most 10 tokens); span_max_length 0: single tokens.
  block.span_p = 0.2
  block.span_max_length = 0
  return block


# The block a run of this method carries (vlp_jax.configs.common.base_config(method)) and
# the valid range of its numeric fields, checked before any compute.
CONFIG_BLOCK = ConfigBlock(
  "cmask",
  _config_defaults,
  {
    "mask_ratio": in_range(0, 1, include_low=False),  # 0 masks nothing: no MLM loss.
    "curriculum_steps": at_least(0),  # 0: the agent from the first step.
    "agent_layers": at_least(1),
    "agent_width": at_least(0),  # 0: the text encoder's.
    "agent_heads": at_least(0),
    "agent_mlp_dim": at_least(0),
    "agent_lr": positive(),
    "agent_weight": at_least(0),
    "entropy_coef": at_least(0),
    "baseline_momentum": in_range(0, 1, include_high=False),
    "gain_weight": at_least(0),
    "span_p": in_range(0, 1),
    "span_max_length": at_least(0),  # 0: single tokens.
  },
)

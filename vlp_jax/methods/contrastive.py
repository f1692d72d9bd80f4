"""Contrastive two-tower training: CLIP, SigLIP, FLIP / cluster / k-means patch masking,
LiT / LilT / BitFit / LoRA (config.peft), pretrained towers, GradCache accumulation.

One step: masker(rng, pixels) -> keep indices (static count) -> CLIP forward on the kept
patches (frozen parameters behind stop_gradient) -> InfoNCE or SigLIP, plain or sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlp_jax import losses, masking, peft, pretrained, sharding
from vlp_jax.masking import show
from vlp_jax.methods.base import (
  Batch,
  Extra,
  LossAndGrads,
  Method,
  MethodContext,
  Metrics,
  Params,
  PredictFn,
  trainable,
)
from vlp_jax.models import CLIP, create_model, embedding_fns


@dataclasses.dataclass(frozen=True)
class Contrastive(Method):
  """A CLIP trained with a contrastive loss on (possibly masked) images.

  `image_fields` / `text_fields`: batch fields concatenated, in order, into the model's
  images and texts (NegCLIP: [images; hard images] and 4 caption fields).
  """

  model: CLIP
  masker: masking.Masker
  loss_fn: losses.LossFn
  labels: Callable[[Params], Any] | None  # peft.labeler; None: everything trains.
  mesh: Mesh
  context_length: int
  image_fields: tuple[str, ...] = ("image",)
  text_fields: tuple[str, ...] = ("tokens",)
  grad_accum_steps: int = 1
  init_specs: tuple[pretrained.InitSpec, ...] = ()
  tower_modes: tuple[tuple[str, str], ...] = (("visual", "all"), ("text", "all"))
  show_masks_every: int = 0  # config.masking.show_every_steps
  seed: int = 0
  report_name: str = "vlp_jax-CLIP"  # The model name in evaluation reports.
  name = "contrastive"

  # ------------------------------------------------------------ jitted

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.model.visual.image_size
    image = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)
    tokens = jax.ShapeDtypeStruct((batch_size, self.context_length), jnp.int32)
    return {**{n: image for n in self.image_fields}, **{n: tokens for n in self.text_fields}}

  def init(self, rng: jax.Array) -> tuple[Params, Extra]:
    size = self.model.visual.image_size
    images = jnp.zeros((1, size, size, 3), jnp.uint8)
    tokens = jnp.zeros((1, self.context_length), jnp.int32)
    return self.model.init(rng, images, tokens)["params"], {}

  def model_inputs(self, batch: Batch) -> dict[str, jax.Array]:
    return stack_fields(batch, self.image_fields, self.text_fields)

  def _forward_loss(
    self, params: Params, inputs: dict[str, jax.Array], keep: jax.Array | None
  ) -> tuple[jax.Array, Metrics]:
    variables = {"params": trainable(params, self.labels)}
    out = self.model.apply(variables, inputs["image"], inputs["tokens"], keep)
    loss, metrics = self.loss_fn(
      out["image"], out["text"], out["logit_scale"], out.get("logit_bias")
    )
    return loss, {**metrics, "logit_scale": out["logit_scale"]}

  def loss(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
    del step
    inputs = self.model_inputs(batch)
    keep, mask_stats = self.masker(rng, inputs["image"])
    loss, metrics = self._forward_loss(params, inputs, keep)
    return loss, ({**metrics, **_prefixed(mask_stats)}, extra)

  def loss_and_grads(
    self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
  ) -> LossAndGrads:
    del step
    inputs = self.model_inputs(batch)
    # The mask is drawn outside the gradient: it depends on pixels only.
    keep, mask_stats = self.masker(rng, inputs["image"])
    if self.grad_accum_steps > 1:
      (loss, metrics), grads = self._accumulated_loss_and_grads(params, inputs, keep)
    else:
      (loss, metrics), grads = jax.value_and_grad(self._forward_loss, has_aux=True)(
        params, inputs, keep
      )
    return (loss, ({**metrics, **_prefixed(mask_stats)}, extra)), grads

  def _accumulated_loss_and_grads(
    self, params: Params, inputs: dict[str, jax.Array], keep: jax.Array | None
  ) -> tuple[tuple[jax.Array, Metrics], Params]:
    """The loss and gradients of the whole batch, holding one microbatch's activations.

    Negatives come from the whole batch (as GradCache does): (1) embed every microbatch
    without gradients; (2) the loss over all embeddings and its gradients with respect to
    them; (3) re-run each microbatch and backpropagate its slice of those gradients.
    Costs one extra forward pass; equals the single-pass result up to summation order.
    """
    inputs = dict(inputs)
    if keep is not None:
      inputs["keep"] = keep
    k = self.grad_accum_steps
    micro_sharding = NamedSharding(self.mesh, PartitionSpec(None, sharding.batch_axes(self.mesh)))
    model = self.model

    def split(x):
      # Microbatch j holds rows j, j + k, ...: every device keeps its own rows.
      x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def merge(x):
      return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def embed(params, micro):
      variables = {"params": trainable(params, self.labels)}
      image = model.apply(variables, micro["image"], micro.get("keep"), method=CLIP.encode_image)
      text = model.apply(variables, micro["tokens"], method=CLIP.encode_text)
      return image, text

    micro = jax.tree.map(split, inputs)
    _, (images, texts) = jax.lax.scan(lambda c, m: (c, embed(params, m)), None, micro)

    def batch_loss(params, images, texts):
      temperature = model.apply({"params": params}, method=CLIP.temperature)
      scale = temperature["logit_scale"]
      loss, metrics = self.loss_fn(images, texts, scale, temperature.get("logit_bias"))
      return loss, {**metrics, "logit_scale": scale}

    (loss, metrics), (grads, image_grads, text_grads) = jax.value_and_grad(
      batch_loss, argnums=(0, 1, 2), has_aux=True
    )(params, merge(images), merge(texts))

    def backprop(grads, xs):
      micro, image_grad, text_grad = xs
      _, vjp = jax.vjp(lambda p: embed(p, micro), params)
      (micro_grads,) = vjp((image_grad, text_grad))
      return jax.tree.map(jnp.add, grads, micro_grads), None

    grads, _ = jax.lax.scan(backprop, grads, (micro, split(image_grads), split(text_grads)))
    return (loss, metrics), grads

  def predict_fns(self) -> dict[str, PredictFn]:
    return embedding_fns(self.model)

  # ------------------------------------------------------------ host

  def param_labels(self) -> Callable[[Params], Any] | None:
    return self.labels

  def pretrained_params(self, gather: Callable[[], Params]) -> Params | None:
    return pretrained.load(list(self.init_specs), gather()) if self.init_specs else None

  def summary(self, params: Params) -> str:
    trainable_count, total = peft.count(params, self.labels)
    modes = dict(self.tower_modes)
    return (
      f"{total / 1e6:.2f}M parameters, {trainable_count / 1e6:.2f}M trainable "
      f"({100 * trainable_count / total:.2f}%; image tower {modes['visual']}, text tower "
      f"{modes['text']})"
    )

  def images_to_log(self, host_batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    if not self.show_masks_every or step % self.show_masks_every:
      return {}
    return {"masks": self.mask_picture(host_batch["image"][:8], step)}

  def mask_picture(self, images: np.ndarray, step: int) -> np.ndarray:
    """(1, H, W, 3) uint8: the images with the patches the encoder drops (and clusters)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    rows = {"dropped": show.compute_masks(self.masker, rng, images)}
    if isinstance(self.masker, masking.ClusterMasking):
      rows["clusters"] = show.cluster_masks(self.masker, rng, images)
    patch_size = self.model.visual.size.patch_size
    return show.draw_mask_grid(images, list(rows.values()), list(rows), patch_size)[None]

  @property
  def model_name(self) -> str:
    return self.report_name


def stack_fields(
  batch: Batch, image_fields: tuple[str, ...], text_fields: tuple[str, ...]
) -> dict[str, jax.Array]:
  """{"image": the image fields concatenated in order, "tokens": the text fields'}."""
  concat = lambda names: jnp.concatenate([jnp.asarray(batch[n]) for n in names])  # noqa: E731
  return {"image": concat(image_fields), "tokens": concat(text_fields)}


def _prefixed(mask_stats: dict[str, jax.Array]) -> Metrics:
  return {f"mask/{k}": v for k, v in mask_stats.items()}


def create(ctx: MethodContext, **overrides: Any) -> Contrastive:
  """The method from config.model / masking / loss / peft (ValueError naming a bad key).

  `overrides` replace fields (NegCLIP: its batch fields and loss)."""
  config = ctx.config
  tuning = peft.tuning_from_config(config.peft)
  model = create_model(
    config.model,
    ctx.tokenizer.vocab_size,
    ctx.tokenizer.pad_id,
    loss_kind=config.loss.kind,
    tuning=tuning,
    platform=ctx.platform,
  )
  masker = masking.create_masker(
    config.masking,
    num_patches=model.visual.num_patches,
    patch_size=model.visual.size.patch_size,
    mean=model.visual.mean,
    std=model.visual.std,
  )
  modes = peft.tower_modes(config.peft)
  # "all" trains everything: plain AdamW, no labels (and the unchanged optimizer state).
  everything = set(modes.values()) == {"all"} and not config.peft.train_also
  fields = dict(
    model=model,
    masker=masker,
    loss_fn=losses.create_loss(config.loss, ctx.mesh),
    labels=None if everything else peft.labeler(config.peft),
    mesh=ctx.mesh,
    context_length=ctx.tokenizer.context_length,
    grad_accum_steps=config.grad_accum_steps,
    # Paths are checked by create_experiment; benchmarks build methods without them.
    init_specs=tuple(pretrained.parse_specs(config, check_paths=False)),
    tower_modes=tuple(modes.items()),
    show_masks_every=config.masking.show_every_steps,
    seed=config.seed,
    report_name=f"vlp_jax-CLIP-ViT-{config.model.image.variant}-{config.model.image.image_size}px",
  )
  fields.update(overrides)
  cls = fields.pop("cls", Contrastive)
  return cls(**fields)

"""The dual encoder that shortlists retrieval candidates for a matching head
(config.eval.itm_retrieval.shortlist): the run of any method whose prediction functions include
embed_image and embed_text (CLIP, NegCLIP, ALBEF...), rebuilt from its config.json, or a
converted CLIP (python -m vlp_jax.weights.convert)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from vlp_jax import sharding
from vlp_jax.config_lib import ConfigError
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks.base import RunConfigFn
from vlp_jax.input_pipeline import tokenizers
from vlp_jax.models import clip

SHORTLIST_KEY = "config.eval.itm_retrieval.shortlist"


EMBEDDINGS = ("embed_image", "embed_text")


@dataclasses.dataclass(frozen=True)
class DualEncoder:
  """A model's two embeddings, its parameters and tokenizer."""

  path: str
  predict_fns: Mapping[str, Callable[..., jax.Array]]  # embed_image and embed_text.
  image_size: int
  params: Any  # Host arrays.
  tokenizer: tokenizers.Tokenizer

  def embed(
    self, embedder: Embedder, images: Sequence[Any], texts: Sequence[str], desc: str = ""
  ) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) unit embeddings, batched on `embedder`'s mesh at this model's own
    image size and with its own tokenizer."""
    own_embedder = Embedder(
      dict(self.predict_fns),
      embedder.mesh,
      self.tokenizer,
      batch_size=embedder.batch_size,
      image_size=self.image_size,
      read_threads=embedder.read_threads,
      show_progress=embedder.show_progress,
    )
    replicated = sharding.replicated(embedder.mesh)
    params = sharding.host_tree_to_global(
      self.params, jax.tree.map(lambda _: replicated, self.params)
    )
    desc = f"{desc} shortlist".strip()
    image_emb = own_embedder.images(params, images, len(images), f"{desc} images")
    return image_emb, own_embedder.texts(params, texts, f"{desc} texts")


def _run_encoder(
  info: dict[str, Any], tokenizer: tokenizers.Tokenizer, key: str, run_config: RunConfigFn
):
  """(predict fns, image size, abstract params) of a run's own method, from its
  config.json; a ConfigError when the method has no embeddings."""
  from vlp_jax import methods  # The method registry: only when shortlisting.

  config = run_config(info["config"], os.path.join(info["workdir"], "config.json"))
  mesh = sharding.create_mesh({"data": -1})
  method = methods.create_method(methods.MethodContext(config, mesh, tokenizer, 1))
  fns = method.predict_fns()
  missing = [name for name in EMBEDDINGS if name not in fns]
  if missing:
    raise ConfigError(
      f"{key}: {info['workdir']} is not a dual encoder: its method {config.method!r} offers "
      f"no {', '.join(missing)}"
    )
  wanted = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0))[0])
  fns = {name: fns[name] for name in EMBEDDINGS}
  return fns, config.model.image.image_size, wanted


def _converted_encoder(fields: dict[str, Any], tokenizer: tokenizers.Tokenizer):
  """(predict fns, image size, abstract params) of a converted CLIP."""
  from vlp_jax.weights import convert

  model = convert.model_from_fields(fields)
  size, length = model.visual.image_size, tokenizer.context_length
  wanted = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, size, size, 3), np.uint8),
    jax.ShapeDtypeStruct((1, length), np.int32),
  )["params"]
  return clip.embedding_fns(model), size, wanted


def _fitting(params: Any, wanted: Any, path: str, key: str) -> Any:
  """`params` restricted to the leaves of `wanted`; a ConfigError naming the misfits."""
  want = traverse_util.flatten_dict(wanted, sep="/")
  have = traverse_util.flatten_dict(params, sep="/")
  problems = [k for k in want if k not in have or tuple(have[k].shape) != want[k].shape]
  if problems:
    raise ConfigError(
      f"{key}: the parameters of {path} do not fit the model its config describes "
      f"({', '.join(problems[:5])}{', ...' if len(problems) > 5 else ''})"
    )
  return traverse_util.unflatten_dict({k: have[k] for k in want}, sep="/")


def load_dual_encoder(
  path: str, key: str = SHORTLIST_KEY, run_config: RunConfigFn | None = None
) -> DualEncoder:
  """The embeddings of a run's workdir (its newest checkpoint, config.json and
  tokenizer.json) or of a converted CLIP directory; a ConfigError naming `key` when it is
  neither, its method has no embeddings, or its parameters do not fit. A run's config
  comes from its config.json through `run_config` (configs/run_config.py's from_values)."""
  from vlp_jax.weights import convert  # Orbax and the importers: only when shortlisting.

  if not os.path.isdir(path):
    raise ConfigError(f"{key}: {path!r} is not a directory (a run's workdir or a converted CLIP)")
  try:
    params, info = convert.read_params(path)
  except (ValueError, OSError) as e:
    raise ConfigError(f"{key}: {e}") from e
  run = info.get("config")
  fields = run.get("model") if run else info.get("model")
  if not isinstance(fields, dict) or "text" not in fields:
    raise ConfigError(f"{key}: {path} is not a dual encoder: its model has no text tower")
  try:
    vocab = convert.run_tokenizer(info)
    tokenizer = tokenizers.create_tokenizer(
      vocab["kind"],
      vocab["vocab_file"] or "",
      fields["text"]["context_length"],
      vocab["lower_case"],
    )
    if run:  # As the run's own method builds it (SigLIP's bias, PEFT factors).
      if run_config is None:
        raise ConfigError(f"{key}: {path} is a run: rebuilding its config needs run_config")
      fns, image_size, wanted = _run_encoder(info, tokenizer, key, run_config)
    else:
      fns, image_size, wanted = _converted_encoder(fields, tokenizer)
  except ConfigError:
    raise
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    raise ConfigError(f"{key}: cannot rebuild the model of {path}: {e!r}") from e
  params = _fitting(params, wanted, path, key)
  logging.info("Retrieval shortlists come from the embeddings of %s", path)
  return DualEncoder(path, fns, image_size, params, tokenizer)

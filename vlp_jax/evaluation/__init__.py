"""Evaluation on held-out image-text sets, shared by the trainer and eval.py."""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlp_jax import sharding
from vlp_jax.evaluation.retrieval import retrieval_metrics
from vlp_jax.input_pipeline import pipeline
from vlp_jax.input_pipeline.tokenizers import WordPieceTokenizer
from vlp_jax.models import CLIP


class RetrievalEvaluator:
  """Embeds every record of an image-text set on the mesh and scores retrieval.

  Every process walks its slice of the records; each step has the same static batch
  shape on every process (padding rows are masked out), so all processes run the same
  number of steps and no program is recompiled.
  """

  def __init__(
    self,
    model: CLIP,
    mesh: Mesh,
    shards: list[str],
    tokenizer: WordPieceTokenizer,
    *,
    batch_size: int,
    image_size: int,
    max_captions: int,
    read_threads: int,
    name: str = "",
  ):
    if batch_size % (jax.process_count() * sharding.batch_size_divisor(mesh)):
      raise ValueError(
        f"config.eval.batch_size={batch_size} is not divisible by the number of batch "
        f"shards ({jax.process_count() * sharding.batch_size_divisor(mesh)})"
      )
    self.name = name or ",".join(shards)
    self.mesh = mesh
    self.local_batch = batch_size // jax.process_count()
    self.max_captions = max_captions
    self.context_length = tokenizer.context_length
    self.image_size = image_size
    self.read_threads = read_threads
    self.num_records = len(grain.sources.ArrayRecordDataSource(shards))
    self.dataset = pipeline.create_eval_dataset(
      shards,
      tokenizer,
      image_size=image_size,
      max_captions=max_captions,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

    def encode(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
      variables = {"params": params}
      images = model.apply(variables, batch["image"], method=CLIP.encode_image)
      tokens = batch["tokens"]
      texts = model.apply(
        variables, tokens.reshape(-1, tokens.shape[-1]), method=CLIP.encode_text
      ).reshape(*tokens.shape[:2], -1)
      return {"image": images, "text": texts, "caption_mask": batch["caption_mask"]}

    self._encode = jax.jit(encode, out_shardings=sharding.batch_sharding(mesh))

  def _host_batches(self):
    """Fixed-size host batches; rows of corrupt records and padding have no captions."""
    steps = math.ceil(math.ceil(self.num_records / jax.process_count()) / self.local_batch)
    elements = iter(
      self.dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=self.read_threads), allow_nones=True
      )
    )
    for _ in range(steps):
      batch = {
        "image": np.zeros((self.local_batch, self.image_size, self.image_size, 3), np.uint8),
        "tokens": np.zeros((self.local_batch, self.max_captions, self.context_length), np.int32),
        "caption_mask": np.zeros((self.local_batch, self.max_captions), bool),
      }
      for row in range(self.local_batch):
        element = next(elements, None)
        if element is not None:
          for key in batch:
            batch[key][row] = element[key]
      yield batch

  def embed(self, params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (image embeddings, text embeddings, image index of each text) over valid rows."""
    outputs = []
    for batch in self._host_batches():
      outputs.append(self._encode(params, sharding.host_to_global(batch, self.mesh)))
    gathered = multihost_utils.process_allgather(outputs, tiled=True)
    images = np.concatenate([o["image"] for o in gathered])
    texts = np.concatenate([o["text"] for o in gathered])
    caption_mask = np.concatenate([o["caption_mask"] for o in gathered])
    has_caption = caption_mask.any(axis=1)
    image_ids = np.cumsum(has_caption) - 1
    text_to_image = np.broadcast_to(image_ids[:, None], caption_mask.shape)[caption_mask]
    return images[has_caption], texts[caption_mask], text_to_image

  def evaluate(self, params: Any) -> dict[str, float]:
    image_emb, text_emb, text_to_image = self.embed(params)
    metrics = retrieval_metrics(image_emb, text_emb, text_to_image)
    metrics["num_images"] = float(len(image_emb))
    metrics["num_texts"] = float(len(text_emb))
    return metrics

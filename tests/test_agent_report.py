"""CMask's agent report as text: the agent_masking task's Markdown tables (most-masked
words, masking rate per word class), computed by hand here from a fixed scoring agent,
and their arrival in TensorBoard through evaluation.log_and_write. No model is trained."""

import glob
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlp_jax import evaluation, progress, sharding
from vlp_jax.evaluation import readers
from vlp_jax.evaluation.embedding import Embedder
from vlp_jax.evaluation.tasks import agent_masking
from vlp_jax.input_pipeline.image_sources import ImageRef
from vlp_jax.input_pipeline.tokenizers import NO_WORD
from vlp_jax.models.agent import INVALID_LOGIT

# [PAD] [CLS] [SEP] [MASK], then words; "cube" is two pieces, so a word's class and its
# masking count over every piece.
VOCAB = [
  "[PAD]",
  "[CLS]",
  "[SEP]",
  "[MASK]",
  "a",
  "red",
  "blue",
  "cu",
  "##be",
  "ball",
  "left",
  "of",
]
PIECES = {"cube": ["cu", "##be"]}
WORD_CLASSES = {
  "colour": ("red", "blue"),
  "shape": ("cube", "ball"),
  "relation": ("left", "of"),
  "function": ("a",),
}
# The fixed agent's logit per vocabulary id: colours first, then shape pieces, "ball", ...
SCORES = {"red": 10.0, "blue": 10.0, "cu": 5.0, "##be": 5.0, "ball": 3.0, "left": 2.0, "of": 2.0}
CAPTIONS = [["a red cube", "a blue ball"], ["a blue cube left of a red ball"]]
MASK_RATIO = 0.5
DATASET = "toy-heldout"


class WhitespaceWordPiece:
  """The tokenizer interface the report uses ([CLS] words [SEP] pad, word ids, vocab)."""

  context_length = 12
  vocab = VOCAB

  def encode_with_word_ids(self, texts):
    ids = np.zeros((len(texts), self.context_length), np.int32)
    word_ids = np.full(ids.shape, NO_WORD, np.int32)
    for row, text in enumerate(texts):
      pieces = [
        (VOCAB.index(p), w) for w, word in enumerate(text.split()) for p in PIECES.get(word, [word])
      ]
      ids[row, 0] = 1
      for pos, (piece, word) in enumerate(pieces, start=1):
        ids[row, pos], word_ids[row, pos] = piece, word
      ids[row, len(pieces) + 1] = 2
    return ids, word_ids

  def __call__(self, texts):
    return self.encode_with_word_ids(texts)[0]


def fixed_agent(params, tokens, images):
  """Logits from a per-id table in params; specials and pad are never maskable. The
  images only have to arrive with the batch's shape."""
  assert images.shape == (tokens.shape[0], 8, 8, 3) and images.dtype == jnp.uint8
  return jnp.where(tokens >= 4, params["score"][tokens], INVALID_LOGIT)


def png(colour) -> ImageRef:
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
  return ImageRef(data=buffer.getvalue())


@pytest.fixture(scope="module")
def result():
  data = readers.RetrievalSet(DATASET, [png("red"), png("blue")], CAPTIONS)
  mesh = sharding.create_mesh({"data": 2}, jax.devices()[:2])
  # Batches of 2 over 3 captions: the second batch carries a padding row.
  embedder = Embedder({}, mesh, WhitespaceWordPiece(), batch_size=2, image_size=8, read_threads=1)
  params = {"score": jnp.asarray([SCORES.get(p, 1.0 if p == "a" else 0.0) for p in VOCAB])}
  task = agent_masking.AgentMaskingTask(data, fixed_agent, MASK_RATIO, WORD_CLASSES)
  (found,) = task.evaluate(embedder, params)
  return found


def test_report_counts_the_agents_top_k_by_word_class(result):
  # k = round(0.5 x maskable tokens) per caption: 2 of 4 (red, cu), 2 of 3 (blue, ball),
  # 5 of 9 (blue, red, cu, ##be, ball). Colours 4 of 4 tokens, shapes 5 of 6 (cube's
  # first piece in caption 1), relation words 0 of 2, "a" 0 of 4.
  assert result.task == "agent_masking" and result.dataset == DATASET
  assert result.metrics["rate/colour"] == 1.0 and result.metrics["tokens/colour"] == 4
  assert (
    result.metrics["rate/shape"] == pytest.approx(5 / 6) and result.metrics["tokens/shape"] == 6
  )
  assert result.metrics["rate/relation"] == 0.0 and result.metrics["tokens/relation"] == 2
  assert result.metrics["rate/function"] == 0.0 and result.metrics["tokens/function"] == 4
  assert "rate/other" not in result.metrics  # Every word here has a class.
  assert result.metrics["masked_share"] == pytest.approx(9 / 16)


def test_texts_are_markdown_tables_of_top_words_and_class_rates(result):
  # Most masked first (cube 3 of its 4 tokens), then ties broken by rate, then token ids.
  assert result.texts["top_words"] == "\n".join(
    [
      "| word | rate | masked | tokens |",
      "|---|---|---|---|",
      "| cube | 0.750 | 3 | 4 |",
      "| red | 1.000 | 2 | 2 |",
      "| blue | 1.000 | 2 | 2 |",
      "| ball | 1.000 | 2 | 2 |",
    ]
  )
  assert result.texts["class_rates"] == "\n".join(
    [
      "| class | rate | tokens |",
      "|---|---|---|",
      "| colour | 1.000 | 4 |",
      "| shape | 0.833 | 6 |",
      "| relation | 0.000 | 2 |",
      "| function | 0.000 | 4 |",
    ]
  )


def read_texts(workdir) -> dict[tuple[int, str], str]:
  """(step, tag) -> text of the TensorBoard event files under `workdir`."""
  import tensorflow as tf

  found = {}
  for path in glob.glob(f"{workdir}/events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "text":
          found[(event.step, value.tag)] = value.tensor.string_val[0].decode()
  return found


def test_log_and_write_sends_the_texts_to_tensorboard(result, tmp_path):
  writer = progress.create_metric_writer(str(tmp_path))  # The trainer's writer.
  evaluation.log_and_write([result], 200, str(tmp_path), writer)
  writer.flush()
  texts = read_texts(tmp_path)
  prefix = f"eval/agent_masking/{DATASET}"
  assert texts == {
    (200, f"{prefix}/top_words"): result.texts["top_words"],
    (200, f"{prefix}/class_rates"): result.texts["class_rates"],
  }

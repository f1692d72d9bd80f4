"""What every evaluation task is made of: its `Result`s, the `Task` object the evaluator
runs, the `TaskDef` the registry holds, and the `Context` a task is built from."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from vlp_jax.config_lib import ConfigError, Rule
from vlp_jax.evaluation import readers, rerank
from vlp_jax.evaluation.embedding import Embedder


@dataclasses.dataclass
class Result:
  task: str
  dataset: str
  metrics: dict[str, float]
  headline: list[str]  # metric keys for the summary table, in order
  heldout: bool = False  # the run's own held-out retrieval (TensorBoard "eval/<metric>")
  # A benchmark's own files (file name -> writer(path)), written beside the result JSON
  # in <out>/step_<N>/<dataset>_<task>/ (a VQA test-dev submission, NLVR2 predictions).
  files: dict[str, Callable[[str], None]] = dataclasses.field(default_factory=dict)
  # Markdown texts (name -> text) for TensorBoard text summaries, written under
  # "eval/<task>/<dataset>/<name>" (CMask's most-masked words and per-class rates).
  texts: dict[str, str] = dataclasses.field(default_factory=dict)


class Task:
  """A dataset read once (at creation) and scored at every evaluation."""

  name = ""

  def evaluate(self, embedder: Embedder, params: Any) -> list[Result]:
    raise NotImplementedError


# (config.json values, where they come from) -> the run's locked config.
RunConfigFn = Callable[[Mapping[str, Any], str], ml_collections.ConfigDict]


@dataclasses.dataclass
class Context:
  """What a task is built from: the run's config, the method's prediction functions,
  the shared embedder, the run's held-out set (read when a task asks for it) and how a
  saved run's config.json becomes its config (configs/run_config.py's from_values, which
  evaluation may not import: the configs sit above it)."""

  config: ml_collections.ConfigDict
  predict_fns: Mapping[str, Callable[..., Any]]
  embedder: Embedder | None
  heldout: Callable[[], readers.RetrievalSet] | None = None
  run_config: RunConfigFn | None = None

  def dataset(self, name: str, hint: str = "") -> str:
    """config.eval.data.<name>; a ConfigError naming the flag when it is empty."""
    text = self.config.eval.data[name]
    if not text:
      raise ConfigError(f"task {name} needs a dataset: --data.{name}=<path>[,key=value...]{hint}")
    return text

  def specs(self, name: str, options: Sequence[str]) -> list[readers.DatasetSpec]:
    """The dataset specs of config.eval.data.<name> (several joined by ";")."""
    return readers.parse_specs(self.dataset(name), f"--data.{name}", options)

  def read_heldout(self, what: str) -> readers.RetrievalSet:
    if self.heldout is None:
      raise ValueError(f"{what} needs the run's eval shards")
    return self.heldout()

  @functools.cached_property
  def matcher(self) -> rerank.Matcher | None:
    """The method's image-text matching head (ALBEF), shared by the tasks that add
    re-ranked or ITM-scored results to their own when config.eval.rerank_k > 0."""
    if not self.config.eval.rerank_k or self.embedder is None:
      return None
    return rerank.create_matcher(dict(self.predict_fns), self.embedder)


@dataclasses.dataclass(frozen=True)
class TaskDef:
  """A registered evaluation task: what it needs from a method and how it is built.

  name: its name in config.eval.tasks and eval.py --tasks.
  needs: the method's prediction functions it calls (`Method.predict_fns` names).
  create: builds its Task(s) from a Context, reading the data now, so bad paths fail
    before any compute.
  reads_data: whether it reads a dataset spec from config.eval.data.<name> (eval.py
    --data.<name>); the others read the run's own held-out set.
  needs_what: what the needed functions are, in words, for the error a method without
    them gets.
  options: its own options, config.eval.<name>: a function returning their defaults (a
    fresh ConfigDict, a comment on each field); None: it has none. Options several tasks
    or the evaluator read (eval.recall_ks, eval.rerank_k, ...) stay in config.eval.
  rules: the valid range of its numeric options, keyed relative to them ("threshold" for
    config.eval.svo.threshold), checked with the config's rules before any compute.
  """

  name: str
  needs: tuple[str, ...]
  create: Callable[[Context], list[Task]]
  reads_data: bool = True
  needs_what: str = "embeddings"
  options: Callable[[], ml_collections.ConfigDict] | None = None
  rules: Mapping[str, Rule] = dataclasses.field(default_factory=dict)

  def config_rules(self) -> dict[str, Rule]:
    """The rules keyed by their path in the whole config ("eval.svo.threshold")."""
    return {f"eval.{self.name}.{key}": rule for key, rule in self.rules.items()}

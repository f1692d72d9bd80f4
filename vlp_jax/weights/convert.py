"""Pretrained checkpoints <-> vlp_jax parameters (the trainer's loader: weights/loader.py).

  python -m vlp_jax.weights.convert --from=open_clip --src=ViT-B-32.safetensors --dst=DIR
  python -m vlp_jax.weights.convert --from=hf_clip --src=clip-vit-base-patch32/ --dst=DIR
  python -m vlp_jax.weights.convert --from=timm --src=mae_pretrain_vit_base.pth --dst=DIR
  python -m vlp_jax.weights.convert --to=open_clip --src=WORKDIR_OR_DIR --dst=out.safetensors

A converted DIR holds the parameters as an orbax checkpoint (DIR/params) and
DIR/vlp_jax_weights.json: the config.model fields the checkpoint needs (printed too), the
source, and which parameters the source did not provide. `loader.load_tower_params` reads
such a directory, a training run's workdir, or a raw open_clip / Hugging Face / timm
checkpoint.
Exported to a directory, a run also gets open_clip_config.json: its model, its pixel
statistics and eval preprocessing, and its tokenizer (open_clip.save_open_clip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from vlp_jax.weights import hf_clip, mapping, open_clip, timm_vit
from vlp_jax.weights.mapping import Params
from vlp_jax.weights.state_dict import (
  WeightsError,
  flatten,
  read_state_dict,
  unflatten,
)

INFO_FILE = "vlp_jax_weights.json"
# A training run's files, written when it starts: its full config, and its tokenizer's
# kind, vocab, pad and end ids.
RUN_CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PARAMS_DIR = "params"
SOURCES = ("open_clip", "hf_clip", "timm")


def detect_source(state_dict: Mapping[str, Any]) -> str:
  """ "open_clip", "hf_clip" or "timm" from a state dict's key names."""
  if "visual.conv1.weight" in state_dict or any(k.startswith("visual.") for k in state_dict):
    return "open_clip"
  if "vision_model.embeddings.patch_embedding.weight" in state_dict:
    return "hf_clip"
  if "patch_embed.proj.weight" in state_dict:
    return "timm"
  if any("word_embeddings" in k for k in state_dict):
    raise WeightsError(
      "this looks like a BERT-family text encoder: load it with vlp_jax.weights.hf_bert"
    )
  raise WeightsError(
    f"unknown checkpoint layout (keys start {sorted(state_dict)[:5]}); expected open_clip, "
    "Hugging Face CLIPModel or timm / MAE ViT"
  )


def import_checkpoint(source: str, state_dict_or_path: Any, template: Any) -> Params:
  """Dispatches to import_open_clip / import_hf_clip / import_timm_vit."""
  importers = {
    "open_clip": open_clip.import_open_clip,
    "hf_clip": hf_clip.import_hf_clip,
    "timm": timm_vit.import_timm_vit,
  }
  if source not in importers:
    raise ValueError(f"unknown source {source!r}; known: {SOURCES}")
  return importers[source](state_dict_or_path, template)


def config_from_checkpoint(
  source: str, state_dict_or_path: Any, activation: str | None = None, source_path: str = ""
) -> dict[str, Any]:
  """Our config.model fields for a checkpoint (see the per-source config_from_*);
  `source_path`: the file or directory a state dict was read from."""
  if source == "open_clip":
    return open_clip.config_from_open_clip(state_dict_or_path, activation, source_path=source_path)
  if source == "hf_clip":
    return hf_clip.config_from_hf_clip(state_dict_or_path, activation, source_path=source_path)
  if source == "timm":
    fields = timm_vit.config_from_timm(state_dict_or_path)
    if activation:
      fields["activation"] = activation
    return fields
  raise ValueError(f"unknown source {source!r}; known: {SOURCES}")


def update_model_config(model_config: Any, fields: Mapping[str, Any]) -> Any:
  """Sets config.model (a ConfigDict) from config_from_* fields, in place; returns it."""
  for key, value in fields.items():
    if isinstance(value, Mapping):
      update_model_config(model_config[key], value)
    else:
      model_config[key] = tuple(value) if isinstance(value, list) else value
  return model_config


def model_from_fields(fields: Mapping[str, Any]) -> Any:
  """Our CLIP for config_from_* fields, as models.create_model would build it (float32);
  a VisionTransformer alone when the fields have no text tower (timm)."""
  from vlp_jax.models import CLIP, TextTransformer, VisionTransformer, decode_variant
  from vlp_jax.models.clip import vit_options

  image = fields["image"]
  size = decode_variant(
    image["variant"], **{k: image.get(k) for k in ("width", "depth", "mlp_dim", "num_heads")}
  )
  activation = fields.get("activation", "gelu")
  visual = VisionTransformer(
    size=size,
    image_size=image["image_size"],
    embed_dim=fields.get("embed_dim") or size.width,
    activation=activation,
    **vit_options(image),
  )
  if "text" not in fields:
    return visual
  text = fields["text"]
  return CLIP(
    visual=visual,
    text=TextTransformer(
      **{k: text[k] for k in ("vocab_size", "context_length", "width", "depth", "num_heads")},
      mlp_dim=text["mlp_dim"],
      embed_dim=fields["embed_dim"],
      activation=activation,
    ),
  )


def _json_ready(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _json_ready(v) for k, v in tree.items()}
  if isinstance(tree, tuple | list):
    return [_json_ready(v) for v in tree]
  return tree


# ---------------------------------------------------------------- converted directories


def save_params(directory: str, params: Params, info: Mapping[str, Any]) -> None:
  """Writes `params` (host arrays) to DIR/params (orbax) and `info` to DIR/INFO_FILE."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  target = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists; choose a new --dst")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, INFO_FILE), "w") as f:
    json.dump(_json_ready(info), f, indent=2)


def read_info(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, INFO_FILE)) as f:
    return json.load(f)


def run_checkpoint_dir(path: str) -> str | None:
  """The orbax checkpoints directory of a training workdir (or the directory itself)."""
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate) and any(
      name.isdigit() and os.path.isdir(os.path.join(candidate, name, "state"))
      for name in os.listdir(candidate)
    ):
      return candidate
  return None


def _restore_run_params(checkpoints: str) -> Params:
  """Parameters of a training run's newest checkpoint, without its optimizer state."""
  import orbax.checkpoint as ocp
  from etils import epath

  with ocp.CheckpointManager(os.path.abspath(checkpoints)) as manager:
    step = manager.latest_step()
  if step is None:
    raise WeightsError(f"no checkpoint in {checkpoints!r}")
  item = epath.Path(os.path.abspath(checkpoints), str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    # The handler's tree metadata: the checkpointer's metadata() would also look for step
    # metadata inside the item, where the manager never writes it, and warn.
    saved = checkpointer.handler.metadata(item).tree["params"]
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    restored = checkpointer.restore(
      item,
      args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
      ),
    )
  logging.info("Read the parameters of step %d from %s", step, checkpoints)
  return restored["params"]


def read_params(path: str) -> tuple[Params, dict[str, Any]]:
  """(parameters, info) of a converted directory or a training run (workdir or its
  checkpoints directory; info then holds the run's config.json as {"config": ...}, its
  tokenizer.json as {"tokenizer": ...} and {"workdir": ...})."""
  import orbax.checkpoint as ocp

  if os.path.isfile(os.path.join(path, INFO_FILE)):
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)))
    return jax.tree.map(np.asarray, params), read_info(path)
  checkpoints = run_checkpoint_dir(path)
  if checkpoints is None:
    raise WeightsError(
      f"{path!r} is neither a converted directory ({INFO_FILE}) nor a training run"
    )
  workdir = os.path.dirname(checkpoints) if checkpoints != path else path
  info: dict[str, Any] = {"source": "vlp_jax run", "workdir": workdir}
  if os.path.isfile(os.path.join(workdir, RUN_CONFIG_FILE)):
    with open(os.path.join(workdir, RUN_CONFIG_FILE)) as f:
      info["config"] = json.load(f)
    info["model"] = info["config"].get("model")
  if os.path.isfile(os.path.join(workdir, TOKENIZER_FILE)):
    with open(os.path.join(workdir, TOKENIZER_FILE)) as f:
      info["tokenizer"] = json.load(f)
  return _restore_run_params(checkpoints), info


# ---------------------------------------------------------------- command line


def convert(source: str, src: str, dst: str, activation: str | None = None) -> dict[str, Any]:
  """Converts a checkpoint to DIR/params + DIR/INFO_FILE; returns the info written."""
  if os.path.exists(os.path.join(dst, PARAMS_DIR)):
    raise FileExistsError(f"{os.path.join(dst, PARAMS_DIR)} exists; choose a new --dst")
  state_dict = read_state_dict(src)
  if source == "auto":
    source = detect_source(state_dict)
  fields = config_from_checkpoint(source, state_dict, activation, source_path=src)
  model = model_from_fields(fields)
  template = mapping.init_params(model, abstract=True)
  params = import_checkpoint(source, state_dict, template)
  flat = flatten(params)
  new_params = sorted(p for p, x in flat.items() if isinstance(x, jax.ShapeDtypeStruct))
  params = unflatten({p: x for p, x in flat.items() if p not in new_params})
  if "text" not in fields:  # A lone image tower: stored as our CLIP's params["visual"].
    params = {"visual": params}
    new_params = [f"visual/{p}" for p in new_params]
  info = {
    "format_version": 1,
    "source": source,
    "src": os.path.abspath(src),
    "model": fields,
    "new_params": new_params,
  }
  if fields.get("text", {}).get("vocab_size") == 49408:
    info["data"] = {"tokenizer": "clip_bpe"}  # CLIP's BPE: bpe_simple_vocab_16e6.txt.gz
  save_params(dst, params, info)
  return info


def export(src: str, dst: str, lora_alpha: float | None = None) -> str:
  """Writes the parameters of a converted directory or a training run as open_clip's."""
  params, info = read_params(src)
  if lora_alpha is None:
    lora_alpha = (info.get("config", {}).get("peft") or {}).get("lora_alpha")
  tokenizer = run_tokenizer(info)
  # open_clip pools the largest token id (CLIP BPE's end token); other vocabularies need
  # its "eos" pooling at their end token, which our last-non-pad pooling equals.
  eos_id = tokenizer.get("eos_id") if tokenizer["kind"] != "clip_bpe" else None
  return open_clip.save_open_clip(
    params,
    dst,
    lora_alpha=lora_alpha,
    model_fields=info.get("model"),
    eos_id=eos_id,
    tokenizer=tokenizer,
  )


def run_tokenizer(info: Mapping[str, Any]) -> dict[str, Any]:
  """The tokenizer of read_params' `info`: tokenizer.json's fields (kind, vocab_size,
  pad_id, eos_id) plus `vocab_file` and `lower_case`, from the run's config where
  tokenizer.json lacks them; vocab_file None where no file is known."""
  from vlp_jax.input_pipeline import tokenizers

  data = {**info.get("data", {}), **(info.get("config", {}).get("data") or {})}
  found = {**info.get("tokenizer", {})}
  found.setdefault("kind", data.get("tokenizer", "clip_bpe"))
  found.setdefault("lower_case", data.get("lower_case", True))
  learned = os.path.join(info.get("workdir", ""), tokenizers.LEARNED_VOCAB_FILE)
  if not found.get("vocab_file"):
    found["vocab_file"] = (
      data.get("vocab_file")
      or (learned if found["kind"] == "wordpiece" and os.path.isfile(learned) else None)
      or tokenizers.default_vocab_file(found["kind"])
    )
  return found


def create_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m vlp_jax.weights.convert",
    description="Convert pretrained CLIP / ViT checkpoints to vlp_jax parameters, or back "
    "to open_clip.",
  )
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument(
    "--from", dest="source", choices=(*SOURCES, "auto"), help="import a checkpoint of this kind"
  )
  direction.add_argument(
    "--to", dest="target", choices=("open_clip",), help="export our parameters to this format"
  )
  parser.add_argument(
    "--src",
    required=True,
    help="--from: a .safetensors / .pt / .bin file or a model directory; --to: a converted "
    "directory or a training workdir (its newest checkpoint)",
  )
  parser.add_argument(
    "--dst",
    required=True,
    help="--from: a new output directory; --to: a .safetensors file, or a directory for "
    "open_clip_model.safetensors + open_clip_config.json",
  )
  parser.add_argument(
    "--activation",
    choices=("gelu", "quick_gelu"),
    default=None,
    help="the MLP activation (not visible in the weights); default: from the directory's "
    "config, or quick_gelu for OpenAI / '*quickgelu*' names, else gelu",
  )
  parser.add_argument(
    "--lora_alpha",
    type=float,
    default=None,
    help="--to: merge LoRA factors with this alpha (default: the run's config.peft)",
  )
  return parser


def main(argv: list[str] | None = None) -> None:
  args = create_parser().parse_args(argv)
  from vlp_jax import cli

  cli.log_to_absl_at_info()
  cli.quiet_library_logs()  # orbax logs every file it writes.
  try:
    if args.target:
      written = export(args.src, args.dst, lora_alpha=args.lora_alpha)
      print(f"wrote {written}")
      return
    info = convert(args.source, args.src, args.dst, activation=args.activation)
  except (WeightsError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {os.path.join(args.dst, PARAMS_DIR)} and {INFO_FILE}; config.model fields:")
  print(json.dumps(_json_ready(info["model"]), indent=2))
  if "data" in info:
    print(f"and config.data fields: {json.dumps(info['data'])}")
  if info["new_params"]:
    print(f"not in the checkpoint (keep their initial values): {info['new_params']}")


if __name__ == "__main__":
  main()

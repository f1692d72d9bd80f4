"""open_clip <-> vlp_jax CLIP parameters (the ViT + causal text transformer family).

Our parameter names mirror open_clip's (models/layers.py), so a key maps by renaming:
"visual/transformer/resblocks_3/attn/in_proj/kernel" <-> "visual.transformer.resblocks.3.
attn.in_proj_weight" (transposed: our Dense kernels are (in, out), torch's (out, in); conv1
is HWIO here, OIHW there). The projections visual.proj and text_projection are plain
(in, out) matrices on both sides. Buffers (attn_mask) and OpenAI's scalar entries
(input_resolution, context_length, vocab_size) are ignored. ResNet, ConvNeXt / timm-trunk
(SigLIP), CoCa and Hugging Face text-tower models fail with a WeightsError.

The text tower sits at the root of open_clip's CLIP state dict (token_embedding, ...) and
under "text." in CustomTextCLIP's; both are read. Export writes CLIP's layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from vlp_jax.models.stacking import unstack_blocks
from vlp_jax.weights import mapping
from vlp_jax.weights.mapping import Params, Source
from vlp_jax.weights.state_dict import WeightsError, flatten

# Checkpoint keys nothing in our model corresponds to: buffers and OpenAI's JIT scalars.
_IGNORED = re.compile(r"(^|\.)attn_mask$|^(input_resolution|context_length|vocab_size)$")

# Prefixes of open_clip models outside the ViT + text-transformer family.
_UNSUPPORTED = {
  "visual.trunk.": "a timm image trunk (SigLIP, ConvNeXt, EVA, ...)",
  "visual.layer1.": "a ResNet image tower",
  "visual.attnpool.": "a ResNet image tower",
  "visual.attn_pool.": "an attentional pooler (CoCa)",
  "text_decoder.": "a text decoder (CoCa)",
  "text.transformer.embeddings.": "a Hugging Face text tower",
  "text.proj.": "a Hugging Face text tower",
}


def _open_clip_key(path: str, text_prefix: str = "") -> tuple[str, str]:
  """Our parameter path -> (open_clip key, "linear" | "conv" | "plain")."""
  parts = path.split("/")
  if len(parts) == 1:  # logit_scale, logit_bias
    return path, "plain"
  tower, *rest = parts
  prefix = {"visual": "visual.", "text": text_prefix}.get(tower)
  if prefix is None:
    raise WeightsError(f"parameter {path!r} has no open_clip counterpart")
  names = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", p) for p in rest]
  leaf = names[-1]
  if len(names) >= 2 and names[-2] == "in_proj":  # nn.MultiheadAttention's fused qkv.
    names = [*names[:-2], f"in_proj_{'weight' if leaf == 'kernel' else 'bias'}"]
    return prefix + ".".join(names), "linear" if leaf == "kernel" else "plain"
  if leaf == "kernel":
    kind = "conv" if names[-2] == "conv1" else "linear"
    return prefix + ".".join([*names[:-1], "weight"]), kind
  if leaf in ("scale", "embedding"):  # LayerNorm / Embed -> torch's "weight"
    return prefix + ".".join([*names[:-1], "weight"]), "plain"
  return prefix + ".".join(names), "plain"


def _check_layout(state_dict: Mapping[str, Any]) -> str:
  """The text tower's key prefix ("" or "text."); fails for models out of scope."""
  for prefix, what in _UNSUPPORTED.items():
    if any(k.startswith(prefix) for k in state_dict):
      raise WeightsError(
        f"this open_clip checkpoint has {what} ({prefix}* keys); only the ViT + text "
        "transformer CLIP family (ViT-B-32, ViT-B-16, ViT-L-14, ...) can be imported"
      )
  if "visual.conv1.weight" not in state_dict:
    found = sorted(state_dict)[:5]
    raise WeightsError(
      f"not an open_clip ViT checkpoint: no visual.conv1.weight (keys start {found})"
    )
  if "text.token_embedding.weight" in state_dict:
    return "text."
  if "text_projection.weight" in state_dict or "text.text_projection.weight" in state_dict:
    raise WeightsError(
      "open_clip text towers with a biased Linear text_projection are not supported"
    )
  return ""


def _source_of(text_prefix: str, shapes: Mapping[str, tuple[int, ...]]):
  def source_of(path: str) -> Source | None:
    key, kind = _open_clip_key(path, text_prefix)
    if kind == "linear":
      return mapping.linear(key)
    if kind == "conv":
      return mapping.conv(key)
    if path in ("logit_scale", "logit_bias"):  # () here, () or (1,) in open_clip
      # logit_bias: only SigLIP-trained checkpoints have one; else the template's stays.
      return mapping.squeeze_to(key, shapes[path], optional=path == "logit_bias")
    return mapping.plain(key)

  return source_of


def import_open_clip(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any], model_or_params_template: Any
) -> Params:
  """Our CLIP parameters from an open_clip checkpoint (path or state dict).

  `model_or_params_template`: our CLIP module (models.create_model) or its parameters
  (initialised, or shapes from jax.eval_shape). A template holding only some parts
  ({"visual": ...}, {"text": ...}, or a VisionTransformer's own parameters) takes only
  those; the rest of the checkpoint is ignored. Adapters and LoRA factors keep their
  template values. Anything else missing, mis-shaped or left over raises a WeightsError
  naming the keys. Returns a tree of NumPy arrays (float32 as the template).
  """
  state_dict = mapping.as_state_dict(state_dict_or_path)
  text_prefix = _check_layout(state_dict)
  template, module = mapping.template_of(model_or_params_template)

  def run(template: Any) -> Params:
    return mapping.convert(
      template,
      state_dict,
      _source_of(text_prefix, mapping.shapes_of(template)),
      source="open_clip checkpoint",
      ignore_unused=mapping.clip_ignore_unused(set(template), ("visual.",), _IGNORED),
      hints=_hints,
    )

  params = mapping.in_unrolled_layout(template, lambda t: mapping.with_tower_root(t, run))
  return mapping.complete(params, module)


def _hints(message: str) -> list[str]:
  hints = []
  if "visual.conv1.bias" in message:
    hints.append("(open_clip's ViT has no patch bias: set config.model.image.patch_bias=False)")
  if "visual.ln_pre" in message:
    hints.append("(set config.model.image.pre_norm to match the checkpoint's ln_pre)")
  if "shape" in message:
    hints.append(
      "(config_from_open_clip(state_dict) gives the config.model fields of this checkpoint)"
    )
  return hints


def export_open_clip(params: Params, *, lora_alpha: float | None = None) -> dict[str, np.ndarray]:
  """Our CLIP parameters -> an open_clip CLIP state dict (float32 NumPy arrays).

  LoRA factors are merged into their kernels (W + alpha / rank * A B; `lora_alpha` is
  config.peft.lora_alpha and must be given when the parameters hold LoRA factors).
  Adapters (LilT) and a patch-embedding bias have no open_clip counterpart: WeightsError.
  Models with pre_norm=False, pool="mean" or a non-default layer-norm epsilon export, but
  open_clip needs the matching model config (open_clip_model_cfg). Scanned blocks
  (config.model.scan_layers) export as open_clip's numbered resblocks.
  """
  if "params" in params and len(params) == 1:
    params = params["params"]
  params = unstack_blocks(params)
  flat = {p: np.asarray(v, dtype=np.float32) for p, v in flatten(params).items()}
  adapters = sorted(p for p in flat if is_adapter(p))
  if adapters:
    raise WeightsError(
      f"open_clip has no adapters; these parameters cannot be exported: {adapters[:6]}"
      + (f" ... ({len(adapters)} in all)" if len(adapters) > 6 else "")
    )
  if "visual/conv1/bias" in flat:
    raise WeightsError("open_clip's ViT has no patch-embedding bias (visual/conv1/bias)")
  if "text" not in params or "token_embedding" not in params["text"]:
    raise WeightsError(
      "only CLIP's causal text transformer exports to open_clip (no params['text']/token_embedding)"
    )
  lora = sorted(p for p in flat if p.endswith("/lora_a"))
  if lora and lora_alpha is None:
    raise WeightsError(
      f"the parameters hold LoRA factors ({lora[0]}, ...): pass lora_alpha "
      "(config.peft.lora_alpha) to merge them into the kernels"
    )
  out = {}
  for path, value in flat.items():
    if path.endswith(("/lora_a", "/lora_b")):
      continue
    if path.endswith("/kernel") and f"{path[: -len('kernel')]}lora_a" in flat:
      base = path[: -len("kernel")]
      a, b = flat[base + "lora_a"], flat[base + "lora_b"]
      value = value + (lora_alpha / a.shape[1]) * (a @ b)
    key, kind = _open_clip_key(path)
    if kind == "linear":
      value = value.T
    elif kind == "conv":
      value = value.transpose(3, 2, 0, 1)
    out[key] = np.ascontiguousarray(value)
  return out


def is_adapter(path: str) -> bool:
  return mapping.is_tuning(path) and not path.endswith(("/lora_a", "/lora_b"))


def save_open_clip(
  params: Params,
  path: str,
  *,
  lora_alpha: float | None = None,
  model_fields: Mapping[str, Any] | None = None,
  eos_id: int | None = None,
  tokenizer: Mapping[str, Any] | None = None,
) -> str:
  """Writes export_open_clip(params) to `path`: a .safetensors file, or a directory that
  gets open_clip_model.safetensors and, with `model_fields` (our config.model fields),
  open_clip_config.json, so open_clip.create_model_and_transforms("local-dir:<path>")
  loads it with our pixel statistics and eval preprocessing; with `eos_id` its text tower
  pools that token ("eos") instead of the largest id ("argmax"); with `tokenizer` (kind,
  vocab_file, lower_case) open_clip.get_tokenizer("local-dir:<path>") gives our ids.
  Files get the umask's permissions (0644 with the usual 022). Returns the weights path."""
  from safetensors.numpy import save_file

  state_dict = export_open_clip(params, lora_alpha=lora_alpha)
  if path.endswith(".safetensors"):
    weights = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)
    weights = os.path.join(path, "open_clip_model.safetensors")
    if model_fields is not None:
      model_cfg = open_clip_model_cfg(model_fields)
      # The tensors are the truth where the config defers to the tokenizer (vocab None).
      text_cfg = model_cfg["text_cfg"]
      text_cfg["vocab_size"], text_cfg["context_length"] = (
        state_dict["token_embedding.weight"].shape[0],
        state_dict["positional_embedding"].shape[0],
      )
      if eos_id is not None:
        text_cfg.update(pool_type="eos", eos_id=int(eos_id))
      if tokenizer is not None:
        text_cfg.update(write_open_clip_tokenizer(path, tokenizer, text_cfg["context_length"]))
      config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": open_clip_preprocess_cfg(model_fields["image"]),
      }
      with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
  save_file(state_dict, weights)
  # safetensors creates its file owner-only (0600); make it as readable as the others.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)
  return weights


def open_clip_preprocess_cfg(image_fields: Mapping[str, Any]) -> dict[str, Any]:
  """open_clip's preprocess_cfg for our config.model.image fields: their pixel statistics
  (None: OpenAI's) and our eval preprocessing (evaluation.embedding.load_pixels: shorter
  side to image_size, bicubic, centre crop)."""
  from vlp_jax.models.vit import CLIP_MEAN, CLIP_STD

  def statistics(key: str, default: tuple[float, ...]) -> list[float]:
    value = image_fields.get(key)  # [0, 1] units in the config, [0, 255] in the model.
    return [float(v) for v in value] if value is not None else [v / 255 for v in default]

  return {
    "size": image_fields["image_size"],
    "mean": statistics("mean", CLIP_MEAN),
    "std": statistics("std", CLIP_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
  }


def write_open_clip_tokenizer(
  path: str, tokenizer: Mapping[str, Any], context_length: int
) -> dict[str, Any]:
  """The text_cfg fields that make open_clip.get_tokenizer("local-dir:<path>") tokenise as
  `tokenizer` (kind, vocab_file, lower_case) does, and the files it reads from `path`.

  clip_bpe: open_clip's own SimpleTokenizer (its copy of CLIP's merges). wordpiece: a
  Hugging Face BertTokenizer (vocab.txt + tokenizer_config.json), which open_clip cleans
  as "whitespace" (ftfy and HTML unescaping too, which ours skips: only mojibake and
  entities tokenise differently). sentencepiece: no open_clip tokenizer; a warning."""
  kind, lower_case = tokenizer["kind"], tokenizer.get("lower_case", True)
  if kind == "clip_bpe":
    return {} if lower_case else {"tokenizer_kwargs": {"clean": "whitespace"}}
  vocab_file = tokenizer.get("vocab_file")
  if kind == "wordpiece" and vocab_file and os.path.isfile(vocab_file):
    shutil.copyfile(vocab_file, os.path.join(path, "vocab.txt"))
    hf_config = {
      "tokenizer_class": "BertTokenizer",
      "do_lower_case": lower_case,
      "model_max_length": context_length,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    # open_clip reads a local-dir model's Hugging Face tokenizer from that directory
    # whatever the name; elsewhere the name is where it looks.
    return {"hf_tokenizer_name": os.path.abspath(path)}
  logging.warning(
    "open_clip_config.json names no tokenizer for this %s vocab (%s): open_clip's "
    "get_tokenizer would give CLIP BPE ids; tokenise with vlp_jax's tokenizer",
    kind,
    vocab_file or "file unknown",
  )
  return {}


def open_clip_model_cfg(model_fields: Mapping[str, Any]) -> dict[str, Any]:
  """open_clip's model config (as in its model_configs/*.json) for our config.model fields
  (a dict or ConfigDict with embed_dim, activation, image.*, text.*)."""
  from vlp_jax.models.vit import decode_variant

  image, text = model_fields["image"], model_fields["text"]
  size = decode_variant(
    image["variant"],
    **{k: image.get(k) for k in ("width", "depth", "mlp_dim", "num_heads")},
  )
  vision_cfg: dict[str, Any] = {
    "image_size": image["image_size"],
    "layers": size.depth,
    "width": size.width,
    "head_width": size.width // size.num_heads,
    "mlp_ratio": size.mlp_dim / size.width,
    "patch_size": size.patch_size,
  }
  if image.get("pre_norm") is False:
    vision_cfg["no_ln_pre"] = True
  if image.get("pool") == "mean":
    vision_cfg.update(pool_type="avg", final_ln_after_pool=True)
  eps = image.get("layer_norm_eps")
  if eps is not None and eps != 1e-5:
    vision_cfg["norm_kwargs"] = {"eps": eps}
  text_cfg = {
    "context_length": text["context_length"],
    "vocab_size": text["vocab_size"],
    "width": text["width"],
    "heads": text["num_heads"],
    "layers": text["depth"],
    "mlp_ratio": text["mlp_dim"] / text["width"],
  }
  return {
    "embed_dim": model_fields["embed_dim"],
    "quick_gelu": model_fields.get("activation") == "quick_gelu",
    "vision_cfg": vision_cfg,
    "text_cfg": text_cfg,
  }


def guess_activation(name: str, state_dict: Mapping[str, Any] | None = None) -> str:
  """ "quick_gelu" for OpenAI's weights and open_clip's "-quickgelu" models, else "gelu".

  The activation leaves no trace in the tensors; this reads the model / file name (and
  OpenAI's scalar entries in `state_dict`). Pass the activation explicitly when unsure:
  open_clip's pretrained tag says (e.g. ViT-B-32 "openai" and "*-quickgelu" configs).
  """
  if re.search(r"quick_?gelu|openai", name.lower()):
    return "quick_gelu"
  if state_dict is not None and "input_resolution" in state_dict:  # OpenAI's own files
    return "quick_gelu"
  return "gelu"


def config_from_open_clip(
  state_dict_or_path: str | os.PathLike | Mapping[str, Any],
  activation: str | None = None,
  *,
  image_heads: int | None = None,
  text_heads: int | None = None,
  source_path: str = "",
) -> dict[str, Any]:
  """Our config.model fields for an open_clip checkpoint, read from its tensor shapes.

  Returns {"embed_dim", "activation", "image": {variant, image_size, width, depth,
  mlp_dim, num_heads}, "text": {vocab_size, context_length, width, depth, num_heads,
  mlp_dim}} where image width/depth/mlp_dim/num_heads are None when the variant has them.
  Head counts leave no trace in the tensors: the image tower's come from our variant table
  for its width (else width / 64, open_clip's default head width), the text tower's are
  width / 64; pass image_heads / text_heads for other checkpoints (e.g. ViT-bigG-14). A
  directory with open_clip_config.json (Hugging Face hub layout) is read for the heads
  and the activation. `activation` None: guess_activation(path). `source_path`: where an
  already read state dict came from (its name and directory are read as a path's).
  """
  name = mapping.source_name(state_dict_or_path, source_path)
  # model_cfg of open_clip_config.json (Hugging Face hub layout), or {}.
  hub_cfg = mapping.json_beside(name, "open_clip_config.json").get("model_cfg", {})
  state_dict = mapping.as_state_dict(state_dict_or_path)
  text_prefix = _check_layout(state_dict)
  num_patches = state_dict["visual.positional_embedding"].shape[0] - 1
  grid = round(num_patches**0.5)
  if grid * grid != num_patches:
    raise WeightsError(f"visual.positional_embedding has {num_patches} patches, not a square grid")
  vision_cfg, text_cfg = hub_cfg.get("vision_cfg", {}), hub_cfg.get("text_cfg", {})
  image = mapping.image_fields(
    state_dict,
    "visual.conv1.weight",
    "visual.transformer.resblocks.",
    "mlp.c_fc.weight",
    grid,
    heads=image_heads,
    head_width=int(vision_cfg["head_width"]) if "head_width" in vision_cfg else None,
  )
  t = text_prefix
  text_width = int(state_dict[f"{t}token_embedding.weight"].shape[1])
  text = {
    "vocab_size": int(state_dict[f"{t}token_embedding.weight"].shape[0]),
    "context_length": int(state_dict[f"{t}positional_embedding"].shape[0]),
    "width": text_width,
    "depth": mapping.count_blocks(state_dict, f"{t}transformer.resblocks."),
    "num_heads": text_heads or int(text_cfg.get("heads", max(text_width // mapping.HEAD_WIDTH, 1))),
    "mlp_dim": int(state_dict[f"{t}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
  }
  if activation is None:
    activation = "quick_gelu" if hub_cfg.get("quick_gelu") else guess_activation(name, state_dict)
  return {
    "embed_dim": int(state_dict["visual.proj"].shape[1]),
    "activation": activation,
    "image": image,
    "text": text,
  }

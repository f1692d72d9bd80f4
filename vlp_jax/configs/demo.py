"""A small CLIP on the built-in dataset: minutes on a laptop CPU.

python train.py --config=configs/demo.py --workdir=/tmp/demo
python train.py --config=configs/demo.py:method=albef --workdir=/tmp/demo_albef
python train.py --config=configs/demo.py:method=cmask --workdir=/tmp/demo_cmask
python train.py --config=configs/demo.py:method=vlc --workdir=/tmp/demo_vlc

method: "contrastive" (CLIP, the default) or "albef" (a small ALBEF: BERT-style text
encoder with 2 text-only + 2 fusion layers, momentum model, queues; configs/albef_vitb16.py
has the full recipe) or "cmask" (that ALBEF with CMask's masking agent) or "vlc" (a small
VLC: the same ViT as one single-stream encoder over caption and image, trained with MLM +
MAE + ITM + word-patch alignment; configs/vlc_vitb16.py has the recipe).
"""

from __future__ import annotations

import ml_collections

from vlp_jax import config_lib
from vlp_jax.configs.common import base_config, use_method


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, steps=600, batch_size=64, masking="none", method="contrastive")
  config = base_config()
  config.batch_size = args.batch_size
  config.total_steps = args.steps

  config.model.embed_dim = 128
  config.model.image.variant = "mu/8"  # width 128, depth 4, 4 heads; 8x8 patches.
  config.model.image.image_size = 64
  config.model.text.context_length = 24  # The longest built-in caption has 22 tokens.
  config.model.text.width = 128
  config.model.text.depth = 4
  config.model.text.num_heads = 4
  config.model.text.mlp_dim = 512

  config.masking.kind = args.masking  # none | random | cluster | kmeans
  config.masking.anchor_ratio = 0.05  # 3 anchors of 64 patches
  config.masking.num_clusters = 6

  config.data.crop_scale = (0.8, 1.0)  # Mild crops keep every shape in view.
  config.data.flip = False  # A flip would turn "left of" into "right of".
  config.data.num_workers = 1

  config.optim.lr = 1e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.1

  if args.method == "albef":
    use_albef(config)
  elif args.method == "cmask":
    use_cmask(config)
  elif args.method == "vlc":
    use_vlc(config)
  elif args.method != "contrastive":
    raise config_lib.ConfigError(
      f"configs/demo.py: method={args.method!r} is not one of ('contrastive', 'albef', 'cmask', 'vlc')"
    )

  config.eval.every_steps = 200
  config.eval.batch_size = 200
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  return config_lib.lock(config)


def use_albef(config: ml_collections.ConfigDict) -> None:
  """The demo's ALBEF: the same image tower, a BERT-style text encoder (2 text-only +
  2 fusion layers) and a queue of 16 batches (ALBEF's 65,536 would outlast the data)."""
  use_method(config, "albef")
  config.model.text.kind = "bert"
  config.albef.fusion_layer = 2
  config.albef.queue_size = 16 * config.batch_size
  # From random init the towers' features start nearly parallel, and with the queue in
  # ITA from step 0 they never part: the batch drifts away from the stale queue instead
  # (held-out ITA R@1 0.1% after 150 steps; 3.9% with the queue out). Half the run
  # contrasts the batch alone.
  config.albef.queue_warmup_steps = config.total_steps // 2
  config.optim.lr = 5e-4  # Post-LN BERT layers: gentler than the CLIP demo's 1e-3.
  config.optim.weight_decay = 0.02  # ALBEF's.


def use_cmask(config: ml_collections.ConfigDict) -> None:
  """The demo's ALBEF with CMask's agent: one agent layer, 30% of each caption masked,
  random masks handed over to the agent during the first half of the run, rewarded by
  information flow plus the image's MLM gain."""
  use_albef(config)
  use_method(config, "cmask")
  config.cmask.agent_layers = 1
  config.cmask.curriculum_steps = config.total_steps // 2
  config.cmask.agent_lr = 1e-3
  # Rewarded by the information flow alone, the demo's agent settles on size words and
  # "a"; adding the MLM-loss drop the image brings (and more entropy) makes it mask
  # colours and shapes instead (tests/test_cmask.py measures the rates).
  config.cmask.gain_weight = 5.0
  config.cmask.entropy_coef = 0.2
  config.eval.tasks = "heldout,agent_masking"  # Which words the agent masks, by class.


def use_vlc(config: ml_collections.ConfigDict) -> None:
  """The demo's VLC: the mu/8 ViT in MAE's layout as the single-stream encoder, a 2-block
  decoder, VLC's losses (word-patch alignment at 0.1 included, config.vlc), and no
  evaluation task (every existing one needs embeddings, which a single-stream model does
  not have). Crops and flips stay the demo's: its captions say "left of"."""
  use_method(config, "vlc")
  config.model.image.layer_norm_eps = 1e-6  # MAE's layout, as configs/vlc_vitb16.py.
  config.model.image.patch_bias = True
  config.model.image.pre_norm = False
  config.vlc.decoder_width = 64
  config.vlc.decoder_depth = 2
  config.vlc.decoder_num_heads = 4
  config.vlc.decoder_mlp_dim = 256
  config.optim.weight_decay = 0.01  # VLC's.
  config.eval.tasks = ""

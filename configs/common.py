"""Defaults shared by every config; each config file changes only what differs."""

from __future__ import annotations

import ml_collections

from vlp_jax.config_lib import (
  EVAL_TASKS,
  Rule,
  at_least,
  each,
  fraction_interval,
  in_range,
  one_of_or,
  positive,
)


def base_config() -> ml_collections.ConfigDict:
  """All fields a run reads, with defaults; variant configs override a few."""
  config = ml_collections.ConfigDict()
  # Training method (vlp_jax/methods): "contrastive" (CLIP, SigLIP, FLIP / cluster
  # masking, LiT / LilT / LoRA: config.loss, masking, peft), "negclip", "albef" or "vlc";
  # fine-tuning a VLC run: "vlc_vqa", "vlc_nlvr2", "vlc_retrieval", "vlc_classify".
  config.method = "contrastive"
  config.seed = 0  # Seeds initialisation, data order, augmentation and masking.
  config.batch_size = 256  # Global batch (all processes together).
  config.total_steps = 0  # Training steps; 0 derives them from num_epochs.
  config.num_epochs = 1.0  # Used when total_steps is 0: epochs over config.data.train.
  # Device mesh axis -> size; -1 takes the remaining devices. The batch splits over
  # "data" and "fsdp"; "fsdp" > 1 also shards parameters and optimizer state (FSDP);
  # "tensor" > 1 splits the transformer's MLP and attention weights (Megatron-style).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 512  # Joint embedding width.
  config.model.activation = "gelu"  # "gelu" (exact) or "quick_gelu" (OpenAI CLIP).
  # Compute dtype; params stay float32 (master weights), logits, softmax, layer-norm
  # statistics and losses are float32. "auto": bfloat16 on GPU/TPU, float32 on CPU.
  config.model.dtype = "auto"
  # Attention kernel: "auto" (cuDNN flash attention on NVIDIA GPUs where dtype and head
  # size allow, XLA elsewhere), "xla", or "cudnn" (fails before compute where it cannot run).
  config.model.attention = "auto"
  # Activation rematerialisation: "none", "full" (recompute blocks: least memory) or
  # "dots" (keep matmul outputs, recompute elementwise ops).
  config.model.remat = "none"
  # One nn.scan over each CLIP tower's blocks (the ViT and the causal text tower; parameters
  # stacked under "resblocks", leading axis = depth): compile time no longer grows with
  # depth; remat still applies per block. Checkpoints, init_from and weight import/export
  # convert between layouts. A BERT text tower, ALBEF / CMask and VLC stay unrolled
  # (not applied); peft modes that treat blocks differently (unlock_last) are refused.
  config.model.scan_layers = False
  # A whole pretrained CLIP ("open_clip:PATH", "hf_clip:PATH" or a converted directory),
  # loaded when the workdir has no checkpoint yet; the tower inits below override its parts.
  config.model.init = ""
  config.model.image = ml_collections.ConfigDict()
  config.model.image.variant = "B/16"  # ViT size/patch, e.g. "Ti/16", "S/16", "B/16", "L/14".
  config.model.image.image_size = 224  # Input resolution in pixels.
  # Per-field overrides of the variant table (None: take the variant's value).
  config.model.image.width = ml_collections.FieldReference(None, field_type=int)
  config.model.image.depth = ml_collections.FieldReference(None, field_type=int)
  config.model.image.mlp_dim = ml_collections.FieldReference(None, field_type=int)
  config.model.image.num_heads = ml_collections.FieldReference(None, field_type=int)
  # Architecture options for towers converted from timm / MAE (vlp_jax.weights; the
  # converter prints the values a checkpoint needs). Defaults: open_clip's ViT.
  config.model.image.layer_norm_eps = 1e-5  # timm / MAE: 1e-6.
  config.model.image.patch_bias = False  # A bias on the patch embedding (timm / MAE: True).
  config.model.image.pre_norm = True  # ln_pre before the blocks (timm / MAE: False).
  config.model.image.pool = "cls"  # "cls" token or "mean" of patch tokens (timm "avg").
  # Pixel statistics in [0, 1] units, RGB; None: OpenAI CLIP's. timm / MAE ViTs mostly
  # use ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
  config.model.image.mean = ml_collections.FieldReference(None, field_type=tuple)
  config.model.image.std = ml_collections.FieldReference(None, field_type=tuple)
  # Dropout in the image tower's blocks during training steps (evaluation never drops):
  # timm's drop_rate (attention output, MLP) and attn_drop_rate (attention probabilities).
  # 0 in every reference: open_clip, ALBEF's ViT (models/vit.py), VLC's single-stream
  # blocks (vlc/modules/mae_transformer.py). ALBEF / CMask / VLC only: CLIP refuses > 0.
  config.model.image.dropout = 0.0
  config.model.image.attention_dropout = 0.0
  # Pretrained image tower: "FORMAT:PATH" with FORMAT open_clip (a CLIP's visual part),
  # hf_clip or timm (also MAE), or a directory written by `python -m vlp_jax.weights.convert`.
  # Loaded when the workdir has no checkpoint yet; "": random initialisation.
  config.model.image.init = ""
  config.model.text = ml_collections.ConfigDict()
  # "clip": causal transformer pooling the end token (open_clip's); "bert": bidirectional
  # BERT-family encoder (BERT, MiniLM, SimCSE) with config.model.text.pooling.
  config.model.text.kind = "clip"
  config.model.text.pooling = "cls"  # bert: "cls" token or "mean" over non-pad tokens.
  # bert: position-embedding rows (the checkpoint's max_position_embeddings); None:
  # context_length. Captions are still cut to context_length tokens.
  config.model.text.max_positions = ml_collections.FieldReference(None, field_type=int)
  config.model.text.layer_norm_eps = 1e-12  # bert only (CLIP's text tower uses 1e-5).
  # Pretrained text tower: "FORMAT:PATH", FORMAT hf_bert (a Hugging Face model directory),
  # open_clip or hf_clip (the text part), or a converted directory; "": random init.
  config.model.text.init = ""
  # Token embedding rows; None: the tokenizer's vocabulary size.
  config.model.text.vocab_size = ml_collections.FieldReference(None, field_type=int)
  config.model.text.context_length = 77  # Tokens per caption, including [CLS]/[SEP].
  config.model.text.width = 512
  config.model.text.depth = 12
  config.model.text.num_heads = 8
  config.model.text.mlp_dim = 2048
  # Dropout in the text tower during training steps (evaluation never drops). ALBEF /
  # CMask's BERT: hidden_dropout_prob (embeddings, attention and FFN outputs) and
  # attention_probs_dropout_prob (self- and cross-attention), 0.1 each in ALBEF's
  # configs/config_bert.json (configs/albef_vitb16.py sets them). VLC: dropout on the text
  # embeddings only, 0.1 (vlc/config.py drop_rate; configs/vlc_vitb16.py), and no
  # attention_dropout. CLIP's towers (open_clip): none, and > 0 is refused.
  config.model.text.dropout = 0.0
  config.model.text.attention_dropout = 0.0

  # What trains (vlp_jax/peft.py): "all" (CLIP), "lit" (image tower frozen), "lilt"
  # (towers frozen but layer norms, adapters, projections), "bitfit" (biases, projections),
  # "unlock_last" (last block per tower, projections), "lora" (LoRA factors only).
  config.peft = ml_collections.ConfigDict()
  config.peft.preset = "all"
  # Per-tower overrides of the preset's mode: "all", "frozen", "lilt", "bitfit",
  # "unlock_last", "lora"; "": the preset's. E.g. a pretrained text tower, locked: text="frozen".
  config.peft.image = ""
  config.peft.text = ""
  config.peft.adapter_reduction = 4  # lilt: adapter width = tower width / this.
  config.peft.lora_rank = 16  # lora: rank of A (in x r) and B (r x out).
  config.peft.lora_alpha = 32.0  # lora: the update is (alpha / rank) * x A B.
  # lora: comma list of Dense names to adapt (e.g. "in_proj,out_proj"); "": all of them.
  config.peft.lora_targets = ""
  # Regex over parameter paths that also train, e.g. "logit_scale|proj" or "attn/".
  config.peft.train_also = ""

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "clip"  # "clip" (softmax InfoNCE) or "siglip" (pairwise sigmoid).
  # clip: "auto" (XLA places the gathers), "gathered" (all-gather features, full logits
  # on every device) or "local" (each device scores its own rows). siglip: "auto"/"full"
  # (B x B logits) or "ring" (text chunks passed around the devices; b x b at a time).
  config.loss.form = "auto"
  # config.method "negclip" (vlp_jax/methods/negclip.py): hard images are every record's nearest
  # neighbour by the starting model's image embedding (mined once per run into the
  # workdir), negatives swap two same-part-of-speech words or noun phrases. Tagger:
  # "auto" (spaCy's en_core_web_sm if installed, else the lexicon), "lexicon" (the
  # built-in dataset's words), "spacy" or "spacy:<model>"
  # (pip install spacy && python -m spacy download en_core_web_sm).
  config.negclip = ml_collections.ConfigDict()
  config.negclip.tagger = "auto"
  config.negclip.block_size = 4096  # Embeddings compared per block when mining.
  # config.method "albef" (vlp_jax/methods/albef.py): ALBEF's ITA (momentum-distilled
  # InfoNCE over batch + queue), ITM (hard negatives) and MLM (momentum-distilled). The
  # text encoder is config.model.text (kind "bert"), its layers from fusion_layer on
  # cross-attend to the image tokens; config.model.embed_dim is the ITA width (256).
  config.albef = ml_collections.ConfigDict()
  config.albef.fusion_layer = 6  # First text layer with cross-attention (BERT-base: 6 of 12).
  config.albef.momentum = 0.995  # EMA of the momentum encoders, updated before they run.
  # Momentum features kept per modality (ALBEF: 65,536); a multiple of batch_size.
  config.albef.queue_size = 65_536
  # Steps during which ITA contrasts the batch alone (the queues still fill). 0, as ALBEF,
  # whose towers start pretrained; from random init the towers' features are nearly one
  # vector, and stale queue rows let ITA fall by drifting the batch away from them
  # instead of telling its pairs apart (configs/demo.py's ALBEF never learned ITA).
  config.albef.queue_warmup_steps = 0
  config.albef.alpha = 0.4  # Weight of the momentum model's soft targets (ITA and MLM).
  # alpha rises linearly from 0 over these steps; 0: one epoch of config.data.train.
  config.albef.alpha_ramp_steps = 0
  config.albef.temperature = 0.07  # Initial ITA temperature (learned, clamped below).
  config.albef.temperature_min = 0.001
  config.albef.temperature_max = 0.5
  config.albef.mlm_probability = 0.15  # Share of tokens (not pad, [CLS]) masked for MLM.
  # How a masked token is replaced: [MASK], a random id, unchanged (BERT's 80/10/10).
  config.albef.mlm_replace = (0.8, 0.1, 0.1)
  config.albef.ita_weight = 1.0  # Loss weights (ALBEF: all equal).
  config.albef.itm_weight = 1.0
  config.albef.mlm_weight = 1.0
  # config.method "cmask" (vlp_jax/methods/cmask.py): ALBEF (config.albef) whose MLM
  # tokens a masking agent picks, trained in the same step with REINFORCE on the
  # information flow from the image into the tokens it masks.
  config.cmask = ml_collections.ConfigDict()
  config.cmask.mask_ratio = 0.3  # Tokens masked per caption: round(ratio x length).
  # The agent's share of each caption's masks rises linearly from 0 (random masking) to 1
  # over these steps; 0: the agent from the first step.
  config.cmask.curriculum_steps = 10_000
  config.cmask.agent_layers = 2  # Agent-owned cross-attention layers.
  config.cmask.agent_width = 0  # Their width; 0: the text encoder's.
  config.cmask.agent_heads = 0  # 0: the text encoder's.
  config.cmask.agent_mlp_dim = 0  # 0: the text encoder's.
  config.cmask.agent_lr = 1e-4  # Adam, constant, clipped at global norm 1.
  config.cmask.agent_weight = 1.0  # Weight of the REINFORCE loss in the total.
  config.cmask.entropy_coef = 0.01  # Entropy bonus of the agent's token softmax.
  config.cmask.baseline_momentum = 0.99  # Running-mean reward baseline.
  # Reward = flow + gain_weight x the MLM-loss drop the image brings (a second,
  # image-free fusion pass); 0: flow only.
  config.cmask.gain_weight = 0.0
  # Span masking: the agent picks span starts, each grown right by a geometric length
  # (SpanBERT: p 0.2, at most 10 tokens); span_max_length 0: single tokens.
  config.cmask.span_p = 0.2
  config.cmask.span_max_length = 0
  # config.method "vlc" (vlp_jax/methods/vlc.py): one single-stream transformer over
  # [text; image] trained with MLM + MAE + ITM (VLC). The encoder is config.model.image's
  # ViT in MAE's layout (layer_norm_eps, patch_bias, mean / std apply; pre_norm and pool
  # do not: no ln_pre, every token through the final norm, the text's [CLS] pooled); its
  # text side reads config.model.text's context_length, max_positions, vocab_size and
  # layer_norm_eps. An MAE checkpoint (encoder and decoder): config.model.image.init.
  config.vlc = ml_collections.ConfigDict()
  config.vlc.mlm_ratio = 0.15  # Share of words (whole_word) or tokens predicted by MLM.
  config.vlc.whole_word = True  # Mask every piece of a selected word (tokens_word_ids).
  config.vlc.mask_ratio = 0.6  # Share of patches dropped from the encoder, in both passes.
  config.vlc.norm_pix_loss = True  # MAE's target: pixels normalised per patch.
  config.vlc.mlm_weight = 1.0  # Loss weights (VLC: all 1).
  config.vlc.mae_weight = 1.0  # 0 also skips the decoder.
  config.vlc.itm_weight = 1.0
  # Word-patch alignment (ViLT's optimal transport) on the ITM pass, and its weight: on
  # at 0.1, as VLC's pretraining (compute_itm_wpa adds 0.1 x the OT loss to every step).
  config.vlc.wpa = True
  config.vlc.wpa_weight = 0.1
  # MAE decoder on the fused image tokens (MAE's ViT-B: 512 wide, 8 blocks, 16 heads).
  config.vlc.decoder_width = 512
  config.vlc.decoder_depth = 8
  config.vlc.decoder_num_heads = 16
  config.vlc.decoder_mlp_dim = 2048
  # Fine-tuning a VLC run on a downstream task: config.method "vlc_vqa", "vlc_nlvr2",
  # "vlc_retrieval" or "vlc_classify" (vlp_jax/methods/vlc_tasks.py). The encoder is
  # config.model's, read as for "vlc": give the pretraining run's model and tokenizer.
  config.finetune = ml_collections.ConfigDict()
  # The VLC run (its workdir) whose newest checkpoint gives the encoder and pooler (and
  # the retrieval rank head, from its ITM head), loaded when this workdir has no
  # checkpoint yet; "none": random initialisation, on purpose ("" is refused when a fresh
  # run starts: a fine-tune without its pretraining would look valid and is not).
  config.finetune.pretrained = ""
  # The task's training data, one spec ("builtin": the generated set below): vqa
  # "QUESTIONS_JSON,annotations=ANNOTATIONS_JSON,images=COCO_DIR", nlvr2
  # "train.json,images=DIR", classify a class-folder tree or wds directory
  # [,train_split=train]. Retrieval trains on config.data.train's image-text shards.
  # Evaluation reads config.eval.data.<vqa|nlvr2|classify_finetuned|itm_retrieval>.
  config.finetune.train = "builtin"
  # VQA answers (the head's outputs): a file, one answer per line; "": the answers that
  # are the most common answer of >= min_answer_count training questions (VQAv2: 3,129).
  config.finetune.answers = ""
  config.finetune.min_answer_count = 9
  # Layer-wise lr decay: encoder block i trains at lr * lr_decay ** (depth - i), the
  # embeddings at lr * lr_decay ** (depth + 1), final norm, pooler and heads at lr (VLC: 0.5).
  config.finetune.lr_decay = 0.5
  # The new heads' (VQA, NLVR2, classifier) lr multiplier. VLC's layer-wise groups give
  # them 1 (its lr_mult=10 only reaches its pretraining-style groups, as ViLT's do).
  config.finetune.head_lr_multiplier = 1.0
  # Random-resized-crop area range of training images; None: the whole image (the demos:
  # a crop could cut away what is asked about; configs/vlc_*.py: VLC's (0.9, 1.0)).
  # Flips: classify only.
  config.finetune.crop_scale = ml_collections.FieldReference(None, field_type=tuple)
  config.finetune.flip = False
  # Retrieval: other rows' captions each image is ranked against besides its own (VLC:
  # 15 drawn captions) and the ITM loss weight beside the rank loss, ITM head frozen. 0, as
  # VLC and ViLT train: their configs list "itm": 0.5, but set_task keeps only the losses
  # of weight >= 1, so the rank head trains alone.
  config.finetune.num_negatives = 15
  config.finetune.itm_weight = 0.0
  # Retrieval evaluation (itm_retrieval): the dual encoder whose shortlist_k nearest
  # candidates per query the rank head re-ranks, a CLIP run's workdir or a converted CLIP
  # directory (python -m vlp_jax.weights.convert); a true match outside the shortlist is
  # a miss. "": the rank head scores every pair (VLC's compute_irtr_recall; small sets).
  config.finetune.shortlist = ""
  config.finetune.shortlist_k = 128
  config.finetune.label_smoothing = 0.1  # Classify (MAE's fine-tuning recipe).
  # The generated sets ("builtin"): VQA images (3 questions each) or NLVR2 statement
  # pairs of the training and evaluation splits, their rendered size and seed.
  config.finetune.builtin = ml_collections.ConfigDict()
  config.finetune.builtin.num_train = 2_000
  config.finetune.builtin.num_eval = 300
  config.finetune.builtin.image_size = 64
  config.finetune.builtin.seed = 0
  # NLVR2 statement kinds (comma list of more, both_colour, contains, fewer_shapes, total:
  # input_pipeline/builtin_tasks.py); "": all of them.
  config.finetune.builtin.nlvr2_statements = ""
  # Split each global batch into this many microbatches, with negatives shared across the
  # whole batch (features are cached, then each microbatch is re-run with gradients).
  config.grad_accum_steps = 1

  config.masking = ml_collections.ConfigDict()
  config.masking.kind = "none"  # Image patch masking: "none", "random" (FLIP), "cluster", "kmeans".
  # random: share of patches dropped. cluster/kmeans: target batch-mean mask ratio.
  config.masking.ratio = 0.5
  # cluster/kmeans: the clusters cover at least this share of every image.
  config.masking.min_ratio = 0.3
  # cluster/kmeans: how many of the L patches the image tower gets. "reference" (the
  # released code): floor(L * (1 - min_ratio)), so at ratio 0.5 it still sees 70%, masked
  # patches re-admitted to fill. "target": round(L * (1 - ratio)), dropping exactly the
  # ratio (extra visible patches dropped at random where the clusters covered less).
  config.masking.keep = "reference"
  config.masking.anchor_ratio = 0.03  # cluster: share of patches drawn as anchors.
  config.masking.calibration_steps = 24  # cluster: bisection steps for the threshold.
  config.masking.num_clusters = 8  # kmeans: clusters per image.
  config.masking.kmeans_iterations = 10  # kmeans: Lloyd iterations.
  config.masking.show_every_steps = 0  # Log a mask picture to TensorBoard every N steps.

  config.data = ml_collections.ConfigDict()
  # Training shards: a dir, glob or comma list; "a:0.7,b:0.3" (or a list of such strings)
  # mixes shard sets by weight. "": the built-in dataset.
  config.data.train = ml_collections.FieldReference("", field_type=object)
  config.data.eval = ""  # Held-out retrieval shards; "": the built-in held-out split.
  # Tokeniser: "wordpiece" (BERT), "sentencepiece" or "clip_bpe" (CLIP's byte-level BPE).
  config.data.tokenizer = "wordpiece"
  # Its file: WordPiece vocab (one token per line), SentencePiece `.model`, or CLIP's merges
  # (bpe_simple_vocab_16e6.txt.gz). "": the built-in dataset's WordPiece vocab.
  config.data.vocab_file = ""
  # Lower-case (WordPiece: and strip accents) first; SentencePiece uses its own normaliser.
  config.data.lower_case = True
  config.data.cache_dir = ""  # Where the built-in dataset is written; "": ~/.cache/vlp_jax.
  config.data.crop_scale = (0.5, 1.0)  # Random-resized-crop area range.
  config.data.flip = True  # Random horizontal flips.
  config.data.num_workers = 2  # grain worker processes (0: decode in the trainer process).
  config.data.read_threads = 4  # Threads per process reading and decoding records.
  # Fail when more corrupt records than this. Fine-tuning (vqa / nlvr2) first looks at its
  # task images and fails before training; <workdir>/unreadable_images.txt lists them all.
  config.data.max_skipped_fraction = 0.01
  config.data.builtin = ml_collections.ConfigDict()
  config.data.builtin.num_train = 10_000  # Generated training pairs.
  config.data.builtin.num_heldout = 1_000  # Generated held-out pairs (unseen combinations).
  config.data.builtin.image_size = 64  # Rendered resolution.
  config.data.builtin.vocab_size = 1_000  # Upper bound for the learned WordPiece vocab.
  config.data.builtin.seed = 0  # Generator seed (independent of config.seed).

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 5e-4  # Peak learning rate.
  config.optim.warmup_steps = 2_000  # Linear warmup, then the decay of optim.schedule.
  config.optim.warmup_start_ratio = 0.0  # The warm-up starts at lr x this (ALBEF: 0.1).
  config.optim.schedule = "cosine"  # Decay after warm-up: "cosine" or "linear" (VLC).
  config.optim.end_lr_ratio = 0.0  # Final lr as a share of the peak.
  config.optim.weight_decay = 0.2  # AdamW decoupled decay on matrices.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.eps = 1e-6
  config.optim.grad_clip_norm = 1.0  # Global-norm clipping.

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 1_000  # Run config.eval.tasks every N steps (0: only at the end).
  config.eval.batch_size = 256  # Global eval batch.
  config.eval.max_captions = 5  # Captions per image kept for retrieval (COCO has 5).
  # Tasks run at every evaluation and by eval.py (its --tasks overrides): comma list of
  # heldout (retrieval on data.eval, plus the built-in set's compositional probe),
  # zeroshot_retrieval, zeroshot_classification, linear_probe, sugarcrepe, aro,
  # winoground, crepe, svo; fine-tuned heads (evaluation/finetune.py): vqa, nlvr2,
  # classify_finetuned, itm_retrieval ("builtin" data: the generated sets of config.finetune).
  config.eval.tasks = "heldout"
  # Dataset of each task: "path[,key=value...]", several joined by ";" (eval.py:
  # --data.<task>=...). Formats and options: vlp_jax/evaluation/readers.py,
  # classification_readers.py and compositional_readers.py.
  config.eval.data = ml_collections.ConfigDict({task: "" for task in EVAL_TASKS[1:]})
  config.eval.recall_ks = (1, 5, 10)  # Retrieval recall@k.
  # Methods with an image-text matching head (ALBEF): retrieval also re-ranks each query's
  # top rerank_k candidates by ITA similarity with the ITM score (ALBEF's protocol,
  # evaluation/rerank.py), and the compositional tasks also score with ITM; 0: off.
  config.eval.rerank_k = 128
  config.eval.templates = ""  # Zero-shot prompt file, "{c}" per line; "": CLIP's 80 ImageNet ones.
  # SVO probes: a pair matches when its cosine similarity exceeds this; None: the
  # threshold that maximises the macro accuracy (an oracle, reported with the metrics).
  config.eval.svo_threshold = ml_collections.FieldReference(None, field_type=float)
  config.eval.linear_probe = ml_collections.ConfigDict()  # CLIP_benchmark's probe recipe.
  config.eval.linear_probe.lr = 0.1
  config.eval.linear_probe.epochs = 10
  config.eval.linear_probe.batch_size = 64
  config.eval.linear_probe.seed = 0
  # Share of the training split held out to search the weight decay when the dataset
  # has no validation split (val_split=); 0: no search, weight decay 0.
  config.eval.linear_probe.val_proportion = 0.2

  config.log_every_steps = 50  # Fetch and write metrics every N steps.
  config.checkpoint_every_steps = 1_000  # Save a checkpoint every N steps (and at the end).
  config.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  # Initialise the parameters (not the optimizer) from another run's newest checkpoint
  # when this workdir has none: e.g. FLIP's unmasked tuning after masked pretraining.
  config.init_from = ""
  config.stop_after_steps = 0  # End this run after N steps (checkpointed); 0: run to the end.
  config.max_nonfinite_streak = 20  # Stop after this many non-finite losses in a row.
  # jax.profiler trace of steps [profile_first_step, + profile_num_steps) into the workdir
  # (TensorBoard's profile tab); 0: no trace.
  config.profile_first_step = 0
  config.profile_num_steps = 5
  # Peak FLOP/s of one device for the logged MFU (perf/mfu); 0: look up the device kind
  # (A100, H100, TPU v4/v5/v6), and no MFU where unknown (e.g. CPUs).
  config.peak_flops_per_device = 0.0
  return config


# The valid range of every numeric field of base_config, checked before any compute
# (vlp_jax.config_lib.check_rules). Rules that involve several fields (batch divisibility,
# masking.min_ratio <= masking.ratio, ...) stay where the fields are used. A *_every_steps
# of 0 means "never" where the loop can skip the event (eval: only at the end, mask
# pictures); logging and checkpointing have no "never", so they need >= 1.
_DEVICES = one_of_or((-1,), at_least(1))  # -1: the remaining devices.
RULES: dict[str, Rule] = {
  "seed": at_least(0),
  "batch_size": at_least(1),
  "total_steps": at_least(0),  # 0: from num_epochs.
  "num_epochs": at_least(0),
  "mesh.data": _DEVICES,
  "mesh.fsdp": _DEVICES,
  "mesh.tensor": _DEVICES,
  "model.embed_dim": at_least(1),
  "model.image.image_size": at_least(1),
  "model.image.width": at_least(1),
  "model.image.depth": at_least(1),
  "model.image.mlp_dim": at_least(1),
  "model.image.num_heads": at_least(1),
  "model.image.layer_norm_eps": positive(),
  "model.image.mean": each(in_range(0, 1), length=3),
  "model.image.std": each(positive(), length=3),
  "model.image.dropout": in_range(0, 1, include_high=False),
  "model.image.attention_dropout": in_range(0, 1, include_high=False),
  "model.text.max_positions": at_least(1),
  "model.text.layer_norm_eps": positive(),
  "model.text.vocab_size": at_least(1),
  "model.text.context_length": at_least(2),  # Room for the start and end tokens.
  "model.text.width": at_least(1),
  "model.text.depth": at_least(1),
  "model.text.num_heads": at_least(1),
  "model.text.mlp_dim": at_least(1),
  "model.text.dropout": in_range(0, 1, include_high=False),
  "model.text.attention_dropout": in_range(0, 1, include_high=False),
  "peft.adapter_reduction": at_least(1),
  "peft.lora_rank": at_least(1),
  "peft.lora_alpha": positive(),
  "negclip.block_size": at_least(1),
  "albef.fusion_layer": at_least(0),  # <= model.text.depth: methods/albef.py.
  "albef.momentum": in_range(0, 1),
  "albef.queue_size": at_least(1),  # A multiple of batch_size: methods/albef.py.
  "albef.queue_warmup_steps": at_least(0),
  "albef.alpha": in_range(0, 1),
  "albef.alpha_ramp_steps": at_least(0),  # 0: one epoch.
  "albef.temperature": positive(),
  "albef.temperature_min": positive(),
  "albef.temperature_max": positive(),
  "albef.mlm_probability": in_range(0, 1),
  "albef.mlm_replace": each(in_range(0, 1), length=3),
  "albef.ita_weight": at_least(0),
  "albef.itm_weight": at_least(0),
  "albef.mlm_weight": at_least(0),
  "cmask.mask_ratio": in_range(0, 1, include_low=False),  # 0 masks nothing: no MLM loss.
  "cmask.curriculum_steps": at_least(0),  # 0: the agent from the first step.
  "cmask.agent_layers": at_least(1),
  "cmask.agent_width": at_least(0),  # 0: the text encoder's.
  "cmask.agent_heads": at_least(0),
  "cmask.agent_mlp_dim": at_least(0),
  "cmask.agent_lr": positive(),
  "cmask.agent_weight": at_least(0),
  "cmask.entropy_coef": at_least(0),
  "cmask.baseline_momentum": in_range(0, 1, include_high=False),
  "cmask.gain_weight": at_least(0),
  "cmask.span_p": in_range(0, 1),
  "cmask.span_max_length": at_least(0),  # 0: single tokens.
  "vlc.mlm_ratio": in_range(0, 1),
  "vlc.mask_ratio": in_range(0, 1, include_high=False),  # Keeps >= 1 patch: methods/vlc.py.
  "vlc.mlm_weight": at_least(0),
  "vlc.mae_weight": at_least(0),
  "vlc.itm_weight": at_least(0),
  "vlc.wpa_weight": at_least(0),
  "vlc.decoder_width": at_least(4),  # A multiple of 4 (sin-cos positions): methods/vlc.py.
  "vlc.decoder_depth": at_least(1),
  "vlc.decoder_num_heads": at_least(1),
  "vlc.decoder_mlp_dim": at_least(1),
  "finetune.min_answer_count": at_least(1),
  "finetune.lr_decay": in_range(0, 1, include_high=True),  # 1: no decay.
  "finetune.head_lr_multiplier": positive(),
  "finetune.crop_scale": fraction_interval(),  # None: the whole image.
  "finetune.num_negatives": at_least(1),  # < batch_size: methods/vlc_tasks.py.
  "finetune.shortlist_k": at_least(1),
  "finetune.itm_weight": at_least(0),
  "finetune.label_smoothing": in_range(0, 1, include_high=False),
  "finetune.builtin.num_train": at_least(2),
  "finetune.builtin.num_eval": at_least(1),
  "finetune.builtin.image_size": at_least(8),
  "finetune.builtin.seed": at_least(0),
  "grad_accum_steps": at_least(1),
  "masking.ratio": in_range(0, 1, include_high=False),
  "masking.min_ratio": in_range(0, 1, include_high=False),
  "masking.anchor_ratio": in_range(0, 1),
  "masking.calibration_steps": at_least(1),
  "masking.num_clusters": at_least(1),  # kmeans needs 2: masking.validate.
  "masking.kmeans_iterations": at_least(1),
  "masking.show_every_steps": at_least(0),  # 0: never.
  "data.crop_scale": fraction_interval(),
  "data.num_workers": at_least(0),  # 0: decode in the trainer process.
  "data.read_threads": at_least(1),
  "data.max_skipped_fraction": in_range(0, 1),
  "data.builtin.num_train": at_least(1),
  "data.builtin.num_heldout": at_least(1),
  "data.builtin.image_size": at_least(1),
  "data.builtin.vocab_size": at_least(1),
  "data.builtin.seed": at_least(0),
  "optim.lr": positive(),
  "optim.warmup_steps": at_least(0),
  "optim.warmup_start_ratio": in_range(0, 1),
  "optim.end_lr_ratio": in_range(0, 1),
  "optim.weight_decay": at_least(0),
  "optim.b1": in_range(0, 1, include_high=False),
  "optim.b2": in_range(0, 1, include_high=False),
  "optim.eps": positive(),
  "optim.grad_clip_norm": positive(),  # 0 would clip every update to nothing.
  "eval.every_steps": at_least(0),  # 0: only at the end.
  "eval.batch_size": at_least(1),
  "eval.max_captions": at_least(1),
  "eval.recall_ks": each(at_least(1)),
  "eval.rerank_k": at_least(0),  # 0: no ITM re-ranking.
  "eval.svo_threshold": in_range(-1, 1),  # A cosine similarity.
  "eval.linear_probe.lr": positive(),
  "eval.linear_probe.epochs": at_least(1),
  "eval.linear_probe.batch_size": at_least(1),
  "eval.linear_probe.seed": at_least(0),
  "eval.linear_probe.val_proportion": in_range(0, 1, include_high=False),  # 0: no search.
  "log_every_steps": at_least(1),
  "checkpoint_every_steps": at_least(1),
  "keep_checkpoints": at_least(1),  # 0 would delete every checkpoint, the last one too.
  "stop_after_steps": at_least(0),  # 0: run to the end.
  "max_nonfinite_streak": at_least(1),
  "profile_first_step": at_least(0),  # 0: no trace.
  "profile_num_steps": at_least(1),
  "peak_flops_per_device": at_least(0),  # 0: look up the device kind.
}

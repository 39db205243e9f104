"""Defaults shared by every config in configs/: mesh, the logical-axis rule table, runtime options."""

import ml_collections

from omni_jax import special_tokens

# The one logical -> mesh rule table (MaxText style). Weights: FSDP over `embed`, tensor parallel over
# heads / mlp / vocab. Activations: batch over data+fsdp, sequence over context.
SHARDING_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ("context",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("cache_length", ()),  # KV-cache slots (layers.attention.KVCache); rows and kv heads follow the activations
    ("embed", ("fsdp",)),
    ("thinker_embed", ()),  # the Thinker's width inside the Talker (codec table, input projection)
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("norm", ()),
    ("layers", ()),
    ("lora_rank", ()),  # the rank of a LoRA adapter (omni_jax.layers.lora): small, replicated
    ("vision_patch", ()),  # values of a vision patch row (C * T * p * p)
    ("conv_width", ()),  # convolution taps
    ("mel", ()),  # mel-spectrogram bins (audio encoder input)
    ("conv_out", ()),  # output channels of a conv whose input channels carry `embed`
    ("dit_features", ()),  # Token2Wav DiT input features (timestep frequencies, the input concat)
    ("speaker_channels", ()),  # channels of the DiT's ECAPA-TDNN speaker encoder (small: replicated)
    ("vocoder_channels", ()),  # BigVGAN channels (omni_jax/models/bigvgan.py): small convs, replicated
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
  c.sharding_rules = SHARDING_RULES
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype ("bfloat16" for training at scale)
  c.model.param_dtype = "float32"  # master weights
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # one of omni_jax.config.REMAT_POLICIES
  # None/"xla": dense XLA attention; "cudnn": cuDNN through jax.nn.dot_product_attention (dense mask);
  # never L x L: "blocked" (XLA flash, any backend), "splash" (TPU Pallas), "pallas_gpu" (jax's GPU Pallas
  # kernel), "flash_gpu" (ours: skips other samples' tiles, grouped K/V in place), "auto" (splash on TPU,
  # flash_gpu on GPU, dense or blocked elsewhere). docs/performance.md "Attention".
  c.model.attention_impl = "auto"  # fused kernel on TPU / GPU; dense or blocked by size on CPU (layers/attention.py)
  c.model.thinker = ml_collections.ConfigDict()
  # Parameters to start from: a `python -m omni_jax.convert` output, a training workdir or a step directory.
  # A typed placeholder (None until set), so that --config.init_from=DIR works on the command line.
  c.init_from = ml_collections.config_dict.placeholder(str)
  training(c)
  generation(c)
  return c


def generation(c: ml_collections.ConfigDict) -> None:
  """Decoding defaults of generate.py and omni_jax.generate (overridable per call and on the command line).

  The sampling values are the Qwen2.5 instruct family's generation_config.json (the Omni checkpoint's own
  file is not available offline); the HF export writes them back as generation_config.json.
  """
  g = c.generate = ml_collections.ConfigDict()
  g.max_new_tokens = 256
  g.do_sample = True  # False: greedy
  g.temperature = 0.7
  g.top_k = 20  # 0: off
  g.top_p = 0.8  # 1.0: off
  g.repetition_penalty = 1.05  # 1.0: off (transformers' rule: divide positive logits, multiply negative ones)
  g.seed = 0
  g.max_cache_len = 0  # KV-cache slots; 0: prompt length + max_new_tokens
  g.cache_dtype = ml_collections.config_dict.placeholder(str)  # None: the compute dtype (model.dtype)
  # Stacked layers' weights for decoding and voicing (the decoders' and the Token2Wav DiT's): "split" (one buffer
  # per layer, the layers unrolled), "stacked", or "auto" (split on GPUs, whose programs would copy each layer's
  # slice of a stack before its matmuls).
  g.layer_buffers = "auto"
  # The Talker's speech codes (omni_jax.generate.talker): the released decoding of transformers'
  # Qwen2_5OmniForConditionalGeneration.generate (talker_*); it stops at codec pad or end, never picks codec bos.
  g.talker = ml_collections.ConfigDict(dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.8,
                                            repetition_penalty=1.05, max_new_tokens=4096, seed=0))
  # Token2Wav's sampler (token2wav.sampling.SamplerConfig: transformers' values) and chunked synthesis
  # (token2wav.streaming.StreamingConfig: chunk sizes in DiT blocks, docs/token2wav.md "Streaming synthesis").
  g.token2wav = ml_collections.ConfigDict(dict(num_steps=10, guidance_scale=0.5, sway_coefficient=-1.0,
                                               method="rk4"))
  g.token2wav.streaming = ml_collections.ConfigDict(dict(first_chunk_blocks=1, chunk_blocks=3, past_blocks=2,
                                                         future_blocks=1, vocoder_context=20))


def training(c: ml_collections.ConfigDict) -> None:
  """Trainer, data and eval defaults (keys are checked by omni_jax.config.validate_train)."""
  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 8  # global rows per optimizer step (all devices, all micro-batches)
  t.seq_len = 512
  t.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
  t.lr = 3e-4  # peak learning rate, reached after warmup_steps, then cosine decay to lr * end_lr_factor
  t.warmup_steps = 100
  t.end_lr_factor = 0.1
  t.b1, t.b2, t.eps = 0.9, 0.95, 1e-8
  t.weight_decay = 0.1  # AdamW; never applied to biases and norm scales
  t.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  # Objective name -> weight: the step minimises sum(weight * loss); names come from the towers' entries
  # (omni_jax.towers; the Thinker's next-token loss is "thinker_text"). Weight 0: computed by eval only.
  t.objectives = ml_collections.ConfigDict({"thinker_text": 1.0})
  # The LM head + cross-entropy (omni_jax.thinker.objective.LossLayout): positions per chunk (0: all at
  # once, [B, L, V] float32 logits) and labelled positions gathered per row before the head (0: every position).
  t.loss_chunk_size = 0
  t.label_budget = 0
  # The training loss's gradient computed in the head's forward pass (omni_jax.layers.head_loss): logits are
  # neither kept for the backward pass nor recomputed in it (chunks under remat: one [positions, D] x [D, V]
  # product more per step; the logits at once: [B, L, V] kept).
  t.fused_head_loss = True
  t.freeze = ()  # parameter-path regexes (matched from the start, e.g. "thinker.visual"); no optimizer state
  t.log_every = 10
  t.checkpoint_every = 500
  t.keep_checkpoints = 3  # the latest N are kept ...
  t.keep_every = 0  # ... plus every K-th step (0: none)
  t.async_checkpointing = True
  t.eval_every = 0  # 0: no in-loop evaluation
  t.debug_nan_at_step = -1  # test hook: the loss of this step becomes NaN
  # For MFU; None: omni_jax.datasheets.PEAK_FLOPS by device kind.
  t.peak_flops_per_device = ml_collections.config_dict.placeholder(float)
  d = c.data = ml_collections.ConfigDict()
  d.source = "synthetic"  # omni_jax.input.synthetic; the real sources: omni_jax/input/pipeline.py
  d.seed = 0
  # A stream of (almost) only bad samples stops with an error naming the datasets and skip reasons
  # (omni_jax.input.packing.SkipLimits) instead of spinning: no batch after this many records in a row ...
  d.max_records_without_batch = 10000
  d.max_skip_ratio = 0.5  # ... or more than this fraction of the records skipped,
  d.skip_ratio_min_records = 1000  # counted once this many records were read
  # The codes index of the spoken replies (`python -m omni_jax.units encode`): with a Talker, they train it.
  d.speech_codes = ml_collections.config_dict.placeholder(str)
  # Datasets whose records are preference pairs (chosen / rejected replies) for config.dpo: docs/data.md.
  d.preference = ()
  s = d.synthetic = ml_collections.ConfigDict()  # omni_jax.input.synthetic only
  s.vocab_size = 512  # token ids are drawn below min(this, model vocab)
  s.min_segment_len = 16  # documents are packed, several per row
  s.kinds = ("text",)  # add "image" / "audio" for rows opening with random media (runs the encoders)
  s.image_grid = (1, 4, 4)  # (t, h, w) patches of a synthetic image
  s.audio_frames = 200  # mel frames of the synthetic audio buffer
  e = c.eval = ml_collections.ConfigDict()
  e.steps = 4  # batches per evaluation
  e.batch_size = 8
  e.split = "eval"
  # Evaluators (omni_jax/evaluate, docs/evaluation.md): comma-separated names of the registry.
  e.tasks = "loss"
  e.train_tasks = ""  # train.py's evaluators, when they differ from eval.py's ("": config.eval.tasks)
  e.samples_per_dataset = 0  # loss: the first N records of every dataset, one pass (0: eval.steps batches)
  e.at_start = False  # train.py: also evaluate a fresh run before its first step (the untrained baseline)
  e.files = ml_collections.ConfigDict(dict(asr="", mcq="", open=""))  # task files; "" + demo source: bundled
  e.max_items = 0  # per task (0: all)
  e.max_new_tokens = ml_collections.ConfigDict(dict(asr=48, mcq=8, open=48))
  e.generate_batch_size = 8  # prompts per generation batch (fixed: the last batch is padded)


def talker(c: ml_collections.ConfigDict, thinker_width: int, **text) -> None:
  """config.model.talker with the released codec ids and the decoder sizes in `text`
  (transformers' Qwen2_5OmniTalkerConfig names). Switches: thinker_gradient, units_version (omni_jax.talker)."""
  base = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24),
              max_position_embeddings=32768, tie_word_embeddings=False)
  c.model.talker = ml_collections.ConfigDict(dict(
      text=ml_collections.ConfigDict(dict(base, **text)), embedding_size=thinker_width, num_codes=8192,
      tts_codec_start_token_id=8293, tts_codec_end_token_id=8294, tts_codec_pad_token_id=8292,
      tts_codec_mask_token_id=8296, tts_text_start_token_id=special_tokens.TTS_BOS,
      tts_text_end_token_id=special_tokens.TTS_EOS, tts_text_pad_token_id=special_tokens.TTS_PAD,
      thinker_gradient=True, speakers=ml_collections.ConfigDict({"Chelsie": 151872, "Ethan": 151870}),
      default_speaker="Chelsie"))
  c.model.talker.units_version = ml_collections.config_dict.placeholder(str)
  if "train" in c and "talker_codes" not in c.train.objectives:
    # Built (generation, conversion) but not trained unless weighted: --config.train.objectives.talker_codes=1
    c.train.objectives.talker_codes = 0.0


def generation_ids_within(vocab_size: int) -> dict:
  """pad / user / eos ids of the released checkpoints that a vocabulary of vocab_size can hold: an id outside it
  becomes 0 (pad, user) or is left out (eos; none left: generation runs to max_new_tokens)."""
  ids = special_tokens.THINKER
  return dict(pad_token_id=ids["pad_token_id"] if ids["pad_token_id"] < vocab_size else 0,
              user_token_id=ids["user_token_id"] if ids["user_token_id"] < vocab_size else 0,
              eos_token_ids=tuple(i for i in ids["eos_token_ids"] if i < vocab_size))


def thinker_token_ids(c: ml_collections.ConfigDict) -> None:
  """The released checkpoints' special ids (omni_jax.special_tokens) and position constants."""
  c.update(special_tokens.THINKER)
  c.position_id_per_seconds = 25
  c.seconds_per_chunk = 2
  c.spatial_merge_size = 2

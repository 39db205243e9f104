"""Tiny Qwen2.5-Omni for CPU: builds in seconds; the README's main job and most tests use it.

  python train.py --config configs/tiny.py --workdir workdirs/tiny
  python eval.py --config configs/tiny.py --checkpoint workdirs/tiny

On 2 CPU cores: ~10 s to compile, then ~0.7 s per step (the 151,936-token LM head dominates): 200 steps
in about 3 minutes. On the synthetic data the train loss falls from 11.9 (uniform over the vocabulary) to
about 1.7, and the eval loss to 1.71 with next-token accuracy 0.63 (measured; docs/performance.md).
"""

import ml_collections

from omni_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  c = defaults.base_config()
  t = c.model.thinker
  defaults.thinker_token_ids(t)
  t.text = ml_collections.ConfigDict(dict(
      vocab_size=151936, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
      mrope_section=(2, 3, 3), max_position_embeddings=4096, tie_word_embeddings=False))
  t.audio = ml_collections.ConfigDict(dict(
      num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
      activation_function="gelu", max_source_positions=1500, n_window=100, output_dim=64, freeze=False))
  # Vision: 2 blocks (the second with full attention); 56-pixel windows = 2 x 2 merged tokens, so even small
  # test images span several windows.
  t.vision = ml_collections.ConfigDict(dict(
      depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=14,
      temporal_patch_size=2, spatial_merge_size=2, window_size=56, out_hidden_size=64,
      fullatt_block_indexes=(1,), hidden_act="silu", rope_theta=10000.0, freeze=False))
  _talker(c)
  _training(c)
  _data(c)
  return c


def _talker(c: ml_collections.ConfigDict) -> None:
  """A 2-layer Talker over 64 speech codes (the demo's unit set: `python -m omni_jax.units fit`); codec ids
  pad/bos/eos/mask right above the codes, as in the release (8192 codes, specials from 8292)."""
  defaults.talker(c, 64, vocab_size=72, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, mrope_section=(1, 1, 2),
                  max_position_embeddings=4096)
  t = c.model.talker
  t.num_codes = 64
  t.tts_codec_pad_token_id, t.tts_codec_start_token_id, t.tts_codec_end_token_id = 64, 65, 66
  t.tts_codec_mask_token_id = 67
  # Trained with the Thinker whenever a batch carries spoken replies (config.data.speech_codes).
  c.train.objectives.talker_codes = 1.0


def token2wav(c: ml_collections.ConfigDict) -> None:
  """A tiny Token2Wav (not built by default: configs/demo_token2wav.py adds it): a 4-layer DiT of width 64 over
  the 64 demo units (table of 65 rows; id 0 doubles as guidance's unconditional code, as in the release),
  24-frame blocks with look-back layers 0 and 3 and look-ahead layer 2, ECAPA of width 32, and a BigVGAN of 64
  initial channels. Its flow-matching settings: config.train.token2wav (omni_jax.token2wav.targets)."""
  from omni_jax.models import dit  # pylint: disable=import-outside-toplevel

  c.model.token2wav = ml_collections.ConfigDict()
  c.model.token2wav.dit = dit.config_dict(
      hidden_size=64, num_hidden_layers=4, num_attention_heads=2, head_dim=32, ff_mult=2, emb_dim=32,
      block_size=24, look_ahead_layers=[2], look_backward_layers=[0, 3], repeats=2, num_embeds=64,
      max_position_embeddings=4096, enc_emb_dim=16, enc_dim=32, enc_channels=[32, 32, 32, 32, 96],
      enc_attention_channels=16, enc_se_channels=16, dropout=0.0)
  c.model.token2wav.bigvgan = ml_collections.ConfigDict(dict(upsample_initial_channel=64))
  c.model.token2wav.dtype = "float32"
  c.train.token2wav = ml_collections.ConfigDict(dict(
      time_sampling="cosine", logit_mean=0.0, logit_std=1.0, drop_audio=0.3, drop_code=0.2, max_frames=480,
      ref_frames=300, references=ml_collections.config_dict.placeholder(dict)))


def _training(c: ml_collections.ConfigDict) -> None:
  """A few minutes on 2 CPU cores: small batches, frequent evals and checkpoints."""
  t = c.train
  t.steps, t.batch_size, t.seq_len = 200, 4, 128
  t.lr, t.warmup_steps, t.weight_decay = 3e-3, 20, 0.01
  # SFT rows label a few positions (the replies): the 151,936-wide head runs on at most 96 of them per row,
  # pooled over a device's rows (a batch with more takes the every-position path; the loss is exact either way).
  t.label_budget = 96
  t.log_every, t.eval_every, t.checkpoint_every = 10, 50, 50
  t.keep_checkpoints, t.keep_every = 2, 100
  c.eval.steps, c.eval.batch_size = 2, 4


def _data(c: ml_collections.ConfigDict) -> None:
  """The real input pipeline (docs/data.md). `--config.data.source=demo` trains on the embedded demo corpus
  (built on first use into data.demo_dir in a few seconds); "jsonl" / "tfds" read data.datasets."""
  d = c.data
  d.demo_dir = "~/.cache/omni_jax/demo_corpus"
  d.datasets = ml_collections.ConfigDict()  # jsonl: {name: path | glob | {split: paths}}; tfds: {name: TFDS name}
  d.tfds_data_dir = "~/.cache/omni_jax/tfds"  # where JSONL datasets are converted to ArrayRecord
  d.mixture = ml_collections.ConfigDict(dict(asr=3.0, image=2.0, video=0.5, text=2.0, speech=1.0))
  d.tokenizer = None  # a model directory (tokenizer.json / vocab.json + merges.txt); None: bundled qwen.tiktoken
  d.shuffle = True
  d.worker_count = 0  # grain worker processes (0: decode in the training process, one prefetch thread)
  d.worker_buffer = 2
  d.prefetch = 2
  d.eval_split = "validation"
  d.max_lag = 256  # a bucket waiting this many records for a full batch is emitted as it is
  # Small media for a CPU model: <= 64 tokens per image, 1 frame/s video at ~32 tokens per 2 frames.
  d.media = ml_collections.ConfigDict(dict(image_max_pixels=64 * 28 * 28, video_fps=1.0,
                                           video_min_pixels=16 * 28 * 28, video_max_pixels=32 * 28 * 28,
                                           num_mel_bins=128))
  # Two length buckets of train.batch_size rows; media limits per row (patches = 4 x merged tokens).
  d.buckets = (
      dict(seq_len=256, max_images=2, max_image_patches=512, max_videos=1, max_video_patches=512, max_audios=3,
           max_audio_frames=600),
      dict(seq_len=512, max_images=4, max_image_patches=1024, max_videos=1, max_video_patches=512, max_audios=4,
           max_audio_frames=600),
  )

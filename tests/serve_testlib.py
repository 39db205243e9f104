"""A tiny speaking checkpoint for the server and chat.py tests (tests/conftest.py: tiny_speech_checkpoint)."""

import os

import numpy as np


def speech_config():
  """The tiny config with a small Token2Wav."""
  import ml_collections  # noqa: PLC0415

  from configs import tiny  # noqa: PLC0415

  c = tiny.get_config()
  c.mesh = {"data": 1}
  c.data.media = dict(image_min_pixels=4 * 28 * 28, image_max_pixels=16 * 28 * 28)
  c.model.token2wav = ml_collections.ConfigDict(dict(
      dit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
               block_size=4, look_ahead_layers=(1,), look_backward_layers=(0,), repeats=2, num_embeds=72,
               mel_dim=80, enc_emb_dim=8, enc_dim=8, enc_channels=(16, 16, 16, 16, 48),
               enc_kernel_sizes=(5, 3, 3, 3, 1), enc_dilations=(1, 2, 3, 4, 1), enc_attention_channels=8,
               enc_res2net_scale=2, enc_se_channels=8, dropout=0.0),
      # The smallest vocoder that makes 240 samples per mel frame (Griffin-Lim voices this model: it is quick
      # to build).
      bigvgan=dict(upsample_initial_channel=8, upsample_rates=(8, 6, 5), upsample_kernel_sizes=(16, 12, 11),
                   resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),)), dtype="float32"))
  # The Talker's released sampling, seeded so that these random weights speak 46 codes (0.9 s) before a stop id.
  c.generate.talker.max_new_tokens, c.generate.talker.seed = 48, 1
  return c


def make_checkpoint(path: str, padded_rows_gain: float = 1.0) -> str:
  """speech_config() with random weights and voices (speakers.safetensors beside params/).
  padded_rows_gain: the LM head's columns of the ids past the tokenizer's vocabulary (the padded rows) are
  scaled by it, so that a random model picks those ids often unless decoding masks them."""
  import jax  # noqa: PLC0415

  from omni_jax import checkpoint  # noqa: PLC0415
  from omni_jax import sharding  # noqa: PLC0415
  from omni_jax.models import omni  # noqa: PLC0415
  from omni_jax.token2wav import voice  # noqa: PLC0415

  c = speech_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, state, _ = omni.create_sharded(c, mesh, seed=3)
  if padded_rows_gain != 1.0:
    from omni_jax.input.tokenizer import Tokenizer  # noqa: PLC0415

    head = state["thinker"]["lm_head"]["kernel"]
    real = Tokenizer(c.data.tokenizer).vocab_size
    head.value = head.value.at[:, real:].multiply(padded_rows_gain)
  checkpoint.save_params(path, state, c)
  rng = np.random.default_rng(0)
  voice.write_voices(os.path.join(path, "speakers.safetensors"),
                     {n: (rng.standard_normal(8), rng.standard_normal((12, 80))) for n in ("Chelsie", "Ethan")})
  return path


class LocalServer:
  """An app served by uvicorn in a thread on a free localhost port (stop() ends it)."""

  def __init__(self, app, **config):
    import socket  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                 **config))
    self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.uvicorn.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.05)
    self.url = f"http://127.0.0.1:{self.port}"
    self.ws_url = f"ws://127.0.0.1:{self.port}"

  def stop(self) -> None:
    self.uvicorn.should_exit = True
    self.thread.join(timeout=30)

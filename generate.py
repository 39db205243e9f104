"""Chat with a checkpoint: the reply streams to stdout as it is generated.

  python generate.py --checkpoint workdirs/tiny_demo --prompt "What do you hear?" --audio clip.wav
  python generate.py --checkpoint ckpt/omni7b --prompt "Describe it." --image photo.jpg --max_new_tokens 128
  python generate.py --checkpoint hf/Qwen2.5-Omni-7B --video clip.mp4 --use_audio_in_video --prompt "..." --greedy
  python generate.py --checkpoint ckpt/omni7b --prompt "Say hello." --speak --speaker Ethan   # + reply.wav

--checkpoint: a training workdir (its latest step), a step directory, a `python -m omni_jax.convert` output,
or a transformers directory. --config (optional) sets runtime, mesh and generation defaults
(config.generate; --config.generate.top_p=0.9 ...); the model architecture comes from the checkpoint.
--speak (a model with a Talker): after the text, the Talker's speech codes are generated (config.generate.talker,
the released sampling) and written with the text and speaker to --codes_out as JSON; a model with a Token2Wav
voices them into --wav_out (24 kHz mono WAV; BigVGAN for converted weights, else the Griffin-Lim fallback:
--vocoder, omni_jax/token2wav/voice.py) and, with --mel_png, draws the DiT's mel. A model without one writes the
codes only (an error if --wav_out or --mel_png was given explicitly).
"""

from absl import flags
from ml_collections import config_flags

from omni_jax import cli
from omni_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional Python config file (get_config()).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, step directory, converter output or HF directory.")
_ADAPTER = flags.DEFINE_string("adapter", None, "LoRA adapters merged into the checkpoint: a PEFT adapter directory or "
                               "a LoRA run of train.py (docs/training.md).")
_PROMPT = flags.DEFINE_string("prompt", None, "The user's message.")
_SYSTEM = flags.DEFINE_string("system", None, "System prompt (default: the chat template's).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file (repeatable).")
_AUDIO = flags.DEFINE_multi_string("audio", [], "Audio file (repeatable).")
_VIDEO = flags.DEFINE_multi_string("video", [], "Video file (repeatable).")
_AIV = flags.DEFINE_bool("use_audio_in_video", False, "Feed the videos' own audio tracks, interleaved.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: config.generate.max_new_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k filter (0: off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p (nucleus) filter (1: off).")
_PENALTY = flags.DEFINE_float("repetition_penalty", None, "Repetition penalty (1: off).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding instead of sampling.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config.generate.seed).")
_SPEAK = flags.DEFINE_bool("speak", False, "Also generate the reply's speech codes (needs a Talker).")
_SPEAKER = flags.DEFINE_string("speaker", None, "Voice (config.model.talker.speakers; default: default_speaker).")
_TALKER_MAX_NEW = flags.DEFINE_integer("talker_max_new_tokens", None, "Default: config.generate.talker.")
_TALKER_GREEDY = flags.DEFINE_bool("talker_greedy", False, "Greedy speech codes instead of the released sampling.")
_CODES_OUT = flags.DEFINE_string("codes_out", "reply.codes.json", "Where --speak writes text, speaker and codes.")
_WAV_OUT = flags.DEFINE_string("wav_out", "reply.wav", "Where --speak writes the spoken reply (24 kHz WAV).")
_MEL_PNG = flags.DEFINE_string("mel_png", None, "--speak: also draw the reply's mel spectrogram into this PNG.")
_VOCODER = flags.DEFINE_enum("vocoder", None, ["auto", "bigvgan", "griffin_lim"],
                             "Default: config.generate.voice.vocoder (auto: BigVGAN for converted weights).")
_VOICE_DTYPE = flags.DEFINE_enum("token2wav_dtype", None, ["float32", "bfloat16"],
                                 "Token2Wav compute dtype (default: the checkpoint's, float32).")
_REFERENCE = flags.DEFINE_string("reference_audio", None, "--speak: voice the reply like this recording (a DiT "
                                 "trained here; see omni_jax/token2wav/voice.py) under --speaker's name.")
distributed.define_flags()
flags.mark_flags_as_required(["checkpoint", "prompt"])


def main(argv):
  del argv
  distributed.start_process()  # before anything touches a device
  from omni_jax.generate import api

  settings = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                  top_p=_TOP_P.value, repetition_penalty=_PENALTY.value, seed=_SEED.value,
                  do_sample=False if _GREEDY.value else None)
  model = api.load(_CHECKPOINT.value, _CONFIG.value, adapter=_ADAPTER.value)
  if _SPEAK.value:
    model.set_voice_options(vocoder=_VOCODER.value, dtype=_VOICE_DTYPE.value)
    explicit = flags.FLAGS["wav_out"].present or _MEL_PNG.value is not None or _REFERENCE.value is not None
    if _REFERENCE.value is not None:
      model.voicer.add_clip_voice(_REFERENCE.value, name=_SPEAKER.value or model.speech.cfg.default_speaker)
    api.speak_to_file(model, _PROMPT.value, _CODES_OUT.value, speaker=_SPEAKER.value, wav_out=_WAV_OUT.value,
                      mel_png=_MEL_PNG.value, require_wav=explicit, image=_IMAGE.value,
                      audio=_AUDIO.value, video=_VIDEO.value, use_audio_in_video=_AIV.value, system=_SYSTEM.value,
                      talker_max_new_tokens=_TALKER_MAX_NEW.value,
                      talker_do_sample=False if _TALKER_GREEDY.value else None,
                      **{k: v for k, v in settings.items() if v is not None})
    return
  for piece in model.stream_chat(_PROMPT.value, image=_IMAGE.value, audio=_AUDIO.value, video=_VIDEO.value,
                                 use_audio_in_video=_AIV.value, system=_SYSTEM.value,
                                 **{k: v for k, v in settings.items() if v is not None}):
    print(piece, end="", flush=True)
  print()


if __name__ == "__main__":
  # A bad prompt or setting (a prompt past the model's positions: limits.ContextLengthError) is a ValueError: one
  # `error: ...` line, exit status 2.
  cli.run(main, also=(ValueError,))

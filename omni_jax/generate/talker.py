"""Speech codes from a Thinker generation: the Talker's prefill, then its decode loop, inside one jitted program.

  speech = SpeechGenerator(graphdef, params, config, mesh, param_shardings)
  out = speech.generate(prompt_batch, thinker_output.tokens, speaker="Chelsie")   # out.codes [B, M], out.lengths

The program: one teacher-forced Thinker forward over prompt + generated ids gives the text track
(omni_jax.talker.inputs), the Talker prefills the L + 2 rows of spec §7.2 into its KV cache, and the shared
decode loop (omni_jax.generate.decode.decode_loop, sampling.py's processors) chooses a code per step, feeding
codec_embed(code) + the next text-track row at the next position, until every row chose a stop id (codec pad
or end) or max_new_tokens. The codec bos is never chosen, nor, the stop ids in effect aside, any id at or past
code_limit (omni_jax.generate.limits.talker_code_limit: ids the Token2Wav's code table lacks, or without one
the codec table's padding rows past the codes and special ids); the repetition penalty also sees the prompt's mask
ids, codec pad and bos, as transformers' Talker generate does. Runs on the mesh like the Thinker's generation.
Defaults: config.generate.talker (the released ones: sampling, top-k 40, top-p 0.8, temperature 0.9, penalty
1.05, 4096 codes).
"""

import contextlib
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax import config as config_lib
from omni_jax import sharding
from omni_jax.generate import decode
from omni_jax.generate import limits
from omni_jax.generate.decode import decode_loop, sharded_cache
from omni_jax.generate.sampling import SamplingParams
from omni_jax.models.talker import talker_config
from omni_jax.talker import inputs as inputs_lib
from omni_jax.train import step as step_lib

# The released Talker decoding (transformers' Qwen2_5OmniForConditionalGeneration.generate talker_* defaults).
RELEASED = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_new_tokens=4096,
                seed=0)


class SpeechOutput(NamedTuple):
  """codes [B, max_new_tokens]: the chosen codec ids (the stop id, then codec pad, after a row's end);
  lengths [B]: the speech codes of each row, i.e. the codes before its first stop id (what Token2Wav voices);
  logits [B, max_new_tokens, V] of each step when asked for."""
  codes: np.ndarray
  lengths: np.ndarray
  logits: Optional[np.ndarray] = None

  def row(self, i: int) -> np.ndarray:
    return self.codes[i, :self.lengths[i]]


def make_speech_fn(graphdef: nnx.GraphDef, *, prompt_len: int, max_new_tokens: int, sampling: SamplingParams,
                   stop_ids: Sequence[int], pad_id: int, suppress: Sequence[int], cache_len: int,
                   cache_dtype=None, return_logits: bool = False, stream: bool = False,
                   code_limit: Optional[int] = None, mesh: Optional[Mesh] = None, rules=()):
  """The pure function (params, speech batch, key data, listener id) -> (codes, counts incl. the stop id,
  logits); with stream, each step's codes go to the listener (omni_jax.generate.decode.listening).
  code_limit: codes at or past it are never chosen, but the stop ids."""
  stop = jnp.asarray(tuple(stop_ids), jnp.int32)
  replicated = None if mesh is None or mesh.size == 1 else NamedSharding(mesh, PartitionSpec())

  def fn(params, batch, key_data, listener):
    model = nnx.merge(graphdef, params)
    talker = model.talker
    key = jax.random.wrap_key_data(key_data)
    with sharding.activate(mesh, rules):
      pre = inputs_lib.prefill_inputs(model, batch, prompt_len)
      b = pre["inputs"].shape[0]
      cache = sharded_cache(talker.model, b, cache_len, cache_dtype)
      logits, cache = talker(pre["inputs"], pre["positions"], pre["segment_ids"], cache)
      queue, last = pre["queue"], pre["queue"].shape[1] - 1
      base = pre["positions"][:, :, -1:]  # [3, B, 1]: the position of reply_0's row

      def feed(cache, code, step):  # code c_step in: row L+1+(step+1)
        j = jnp.minimum(step + 1, last)
        x = (queue[:, j] + talker.codec_embed(code)).astype(queue.dtype)
        out, cache = talker(x[:, None], base + step + 1, jnp.ones((b, 1), jnp.int32), cache)
        return cache, out[:, 0]

      sampling_seen = pre["seen"] if sampling.penalises else jnp.zeros((b, 0), bool)
      out = decode_loop(feed, cache, logits[:, -1], sampling_seen, key, max_new_tokens=max_new_tokens,
                        sampling=sampling, eos=stop, pad_token_id=pad_id, return_logits=return_logits,
                        suppress=suppress, listener=listener if stream else None, replicated=replicated,
                        vocab_limit=code_limit, keep=tuple(i for i in stop_ids if i >= 0))
    return out.tokens, out.lengths, out.all_logits

  return fn


class SpeechGenerator:
  """Compiled speech-code generation for one model (Thinker + Talker) on one mesh (params placed by
  param_shardings). Programs are kept per (shapes, settings)."""

  def __init__(self, graphdef: nnx.GraphDef, params: Any, config, mesh: Mesh, param_shardings: Any):
    self.cfg = talker_config(config)
    if self.cfg is None:
      raise ValueError("config.model.talker: this model has no Talker, so it cannot speak")
    self.graphdef, self.params, self.mesh, self.param_shardings = graphdef, params, mesh, param_shardings
    self.rules = tuple(config.sharding_rules)
    self.thinker_ids = config_lib.TokenIds.from_config(config.model.thinker)
    generate = config.get("generate", None)
    talker = generate.get("talker", None) if generate is not None else None
    self.defaults = dict(RELEASED, **(dict(talker) if talker is not None else {}))
    self.cache_dtype = generate.get("cache_dtype") if generate is not None else None
    self.code_limit = limits.talker_code_limit(config)
    self._compiled = {}

  def sampling(self, **overrides) -> SamplingParams:
    """config.generate.talker's rule with the given (non-None) overrides."""
    return SamplingParams.from_config(self.defaults, **overrides)

  @property
  def stop_ids(self) -> tuple[int, int]:
    return (self.cfg.tts_codec_pad_token_id, self.cfg.tts_codec_end_token_id)

  def speaker_tokens(self, speaker: Union[None, str, Sequence[Optional[str]]], batch: int) -> list[int]:
    names = [speaker] * batch if speaker is None or isinstance(speaker, str) else list(speaker)
    if len(names) != batch:
      raise ValueError(f"{len(names)} speakers for {batch} rows")
    return [self.cfg.speaker_token(n) for n in names]

  def _program(self, batch, **static):
    key = (tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())), tuple(sorted(static.items())))
    if key not in self._compiled:
      fn = make_speech_fn(self.graphdef, mesh=self.mesh, rules=self.rules, **static)
      replicated = NamedSharding(self.mesh, PartitionSpec())
      self._compiled[key] = jax.jit(
          fn, in_shardings=(self.param_shardings, step_lib.batch_shardings(batch, self.mesh, self.rules),
                            replicated, replicated), out_shardings=replicated)
    return self._compiled[key]

  def generate(self, prompt: Mapping[str, Any], tokens: np.ndarray, *, speaker=None,
               max_new_tokens: Optional[int] = None, sampling: Optional[SamplingParams] = None,
               seed: Optional[int] = None, eos_token_ids: Optional[Sequence[int]] = None,
               stop_ids: Optional[Sequence[int]] = None, return_logits: bool = False,
               on_code: Optional[decode.OnToken] = None) -> SpeechOutput:
    """Speech codes for the Thinker's replies `tokens` [B, N] (pad after a row's stop id) to `prompt` (the
    left-padded batch they were generated from). speaker: a name of config.model.talker.speakers, one per row,
    or None (default_speaker). eos_token_ids: the Thinker's stop ids (default: its config's), which end each
    row's text track (transformers' batched first-eos rule). stop_ids: the codes that end a row (default codec
    pad and end; () runs every row to max_new_tokens, e.g. to benchmark: every code is then a speech code).
    Only codes below code_limit and the stop ids are ever chosen. on_code(step, codes [B], stopped [B])
    is called from the running program after each step (streaming; rows that stopped show codec pad)."""
    d = self.defaults
    max_new_tokens = int(d["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling or self.sampling()
    prompt = {k: np.asarray(v) for k, v in prompt.items()}
    tokens = np.asarray(tokens)
    eos = tuple(int(i) for i in (self.thinker_ids.eos_token_ids if eos_token_ids is None else eos_token_ids))
    batch = inputs_lib.speech_batch(prompt, tokens, self.cfg, self.speaker_tokens(speaker, tokens.shape[0]), eos)
    prompt_len = prompt["input_ids"].shape[1]
    cache_dtype = config_lib.dtype_of(self.cache_dtype, "generate.cache_dtype") if self.cache_dtype else None
    stop_ids = self.stop_ids if stop_ids is None else tuple(int(i) for i in stop_ids)
    program = self._program(
        batch, prompt_len=prompt_len, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids or (-1,),
        pad_id=self.cfg.tts_codec_pad_token_id, suppress=(self.cfg.tts_codec_start_token_id,),
        cache_len=prompt_len + 2 + max_new_tokens, cache_dtype=cache_dtype, return_logits=return_logits,
        stream=on_code is not None, code_limit=self.code_limit)
    seed = int(d.get("seed", 0) if seed is None else seed)
    with decode.listening(on_code) if on_code is not None else contextlib.nullcontext(np.int32(0)) as listener:
      codes, counts, logits = program(self.params, batch, jax.random.key_data(jax.random.key(seed)), listener)
      codes, counts = np.asarray(codes), np.asarray(counts)  # waits for the program, listener still live
    stopped = np.isin(codes[np.arange(len(counts)), np.maximum(counts - 1, 0)], stop_ids)
    return SpeechOutput(codes, counts - stopped.astype(counts.dtype), np.asarray(logits) if return_logits else None)

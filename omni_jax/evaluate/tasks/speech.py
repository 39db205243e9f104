"""speech: spoken replies, judged offline. For each held-out prompt the model replies greedily (the Thinker's
text, then the Talker's codes, greedy too, then Token2Wav's audio); pocketsphinx transcribes the audio and the
transcript is scored against the reply's own text (WER after normalize.transcript: does the speech say what the
text says), and resemblyzer scores the audio's speaker similarity to the voice's reference clip.

The judges have error floors of their own (omni_jax/evaluate/judges.py, docs/evaluation.md): the evaluator
measures them on the task's recorded replies (an item's `speech`, the dataset's recording of the reference
answer) once per job, as judge_wer (pocketsphinx on the recording vs the reference text) and judge_similarity
(the recording's similarity to the voice's reference clip); read wer and similarity against those.

The voice's reference clip: config.train.token2wav.references[speaker] (a DiT trained here), else the first
item's recording. A model that cannot voice the speaker otherwise is voiced with that clip (a DiT trained here
conditions on a clip of the speaker).

Scalars: <split>/speech/{wer,similarity,judge_wer,judge_similarity,samples,samples_per_s,seconds_of_audio}.
A model without a Talker or a Token2Wav scores nothing: the report says "skipped: no Talker/Token2Wav".
"""

import time

import jiwer
import numpy as np
from flax import nnx

from omni_jax.evaluate import judges
from omni_jax.evaluate import normalize
from omni_jax.evaluate import registry
from omni_jax.evaluate import taskfile
from omni_jax.evaluate.tasks import common
from omni_jax.token2wav import voice as voice_lib

SKIPPED = "skipped: no Talker/Token2Wav"


def _read(path: str) -> tuple[np.ndarray, int]:
  import soundfile  # pylint: disable=import-outside-toplevel

  wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
  return wave.mean(axis=1), int(rate)


def wer(references: list[str], hypotheses: list[str]) -> float:
  """Corpus WER (jiwer) of normalised transcripts."""
  return float(jiwer.wer([normalize.transcript(r) for r in references],
                         [normalize.transcript(h) for h in hypotheses]))


@registry.register("speech")
class Speech:

  def __init__(self, ctx):
    self.ctx = ctx
    model = ctx.config.model
    self.skip = None if (model.get("talker", None) is not None and model.get("token2wav", None) is not None) \
        else SKIPPED
    if self.skip:
      return
    self.items = common.items(ctx, "speech")
    bad = [i for i in self.items if not i.references or not i.speech]
    if bad:
      raise taskfile.TaskFileError(f"speech task item {bad[0].id!r} ({bad[0].task}) needs a reference answer with "
                                   f"its recording (`speech` on the assistant message)")
    self.max_new_tokens = common.max_new_tokens(ctx, "speech", 48)
    self.talker_max_new_tokens = int(ctx.config.eval.get("talker_max_new_tokens", 0) or 0) or None
    self.speaker = model.talker.get("default_speaker", None)
    refs = dict((ctx.config.train.get("token2wav", None) or {}).get("references", None) or {})
    clip = refs.get(self.speaker) if self.speaker else None
    self.reference_clip = (clip if isinstance(clip, str) else list(clip)[0]) if clip else self.items[0].speech
    self._floor = None

  def floor(self) -> dict:
    """The judges on the task's own recordings (computed once: they do not depend on the parameters)."""
    if self._floor is None:
      asr, spk = judges.asr(), judges.speaker_encoder()
      ref_emb = spk.embed(*_read(self.reference_clip))
      hyps, sims = [], []
      for item in self.items:
        wave, rate = _read(item.speech)
        hyps.append(asr(wave, rate))
        if item.speech != self.reference_clip:  # the clip itself would score 1
          sims.append(judges.similarity(spk.embed(wave, rate), ref_emb))
      self._floor = dict(judge_wer=wer([i.references[0] for i in self.items], hyps),
                         judge_similarity=float(np.mean(sims)) if sims else 1.0, judge_transcripts=hyps)
    return self._floor

  def _voicer(self, params) -> voice_lib.Voicer:
    ctx = self.ctx
    token2wav = nnx.merge(ctx.graphdef, params).token2wav
    voicer = voice_lib.Voicer.from_model(token2wav, ctx.config, None)
    name = self.speaker or "reference"
    if name not in voicer.voices:
      voicer.add_clip_voice(self.reference_clip, name=name)
    return voicer

  def __call__(self, params) -> registry.Scores:
    if self.skip:
      return registry.Scores({}, dict(skipped=self.skip))
    floor = self.floor()  # before the clock: the judges' own cost on the recordings is not the model's
    ctx = self.ctx
    start = time.perf_counter()
    chat = ctx.chat
    chat.generator.params = params
    voicer = self._voicer(params)
    size = int(ctx.config.eval.get("generate_batch_size", 8))
    talker = {"talker_do_sample": False, "talker_repetition_penalty": 1.0}
    if self.talker_max_new_tokens:
      talker["talker_max_new_tokens"] = self.talker_max_new_tokens
    replies = []
    for s in range(0, len(self.items), size):
      chunk = [i.messages for i in self.items[s:s + size]]
      padded = chunk + [chunk[-1]] * (size - len(chunk))  # fixed batch shape: compilations repeat
      out = chat.speak_batch(padded, speaker=self.speaker, voice=False, max_new_tokens=self.max_new_tokens,
                             do_sample=False, repetition_penalty=1.0, **talker)
      replies += out[:len(chunk)]
    asr, spk = judges.asr(), judges.speaker_encoder()
    ref_emb = spk.embed(*_read(self.reference_clip))
    texts, transcripts, sims, seconds = [], [], [], 0.0
    for r in replies:
      texts.append(r.text)
      if len(r.codes) == 0:  # no speech at all: nothing said, nothing to compare the voice with
        transcripts.append("")
        sims.append(0.0)
        continue
      v = voicer(r.codes, self.speaker or "reference")
      seconds += len(v.audio) / v.sample_rate
      transcripts.append(asr(v.audio, v.sample_rate))
      sims.append(judges.similarity(spk.embed(v.audio, v.sample_rate), ref_emb))
    elapsed = time.perf_counter() - start
    # WER of the speech against the reply's own text; a reply with no words is scored against the reference
    # answer instead (so an empty reply is not a perfect score).
    targets = [t if normalize.transcript(t) else i.references[0] for t, i in zip(texts, self.items)]
    prefix = f"{ctx.split}/speech"
    scores = dict(wer=wer(targets, transcripts), similarity=float(np.mean(sims)), judge_wer=floor["judge_wer"],
                  judge_similarity=floor["judge_similarity"], samples=float(len(self.items)),
                  samples_per_s=len(self.items) / elapsed, seconds_of_audio=seconds)
    details = dict(max_new_tokens=self.max_new_tokens, speaker=self.speaker, reference_clip=self.reference_clip,
                   vocoder=voicer.vocoder, replies=[
                       dict(common.describe(i), reference=i.references[0], reply=t, transcript=h, similarity=s,
                            judge_transcript=j)
                       for i, t, h, s, j in zip(self.items, texts, transcripts, sims, floor["judge_transcripts"])])
    return registry.Scores({f"{prefix}/{k}": v for k, v in scores.items()}, details)

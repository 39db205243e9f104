"""The adaptation demo's runs on the trained demo model (bench/demo_adaptation.py runs both and measures them).

  python -m data.demo_style && python -m data.demo_preference
  python train.py --config configs/demo_adaptation.py:part=lora --config.init_from=workdirs/tiny_demo \
      --workdir workdirs/tiny_demo/adaptation/lora
  python train.py --config configs/demo_adaptation.py:part=dpo --config.init_from=workdirs/tiny_demo \
      --config.data.speech_codes=CODES --workdir workdirs/tiny_demo/adaptation/dpo

part=lora: configs/recipes/lora.py (+ the LM head) on the style set (every reply ends with " in the dark.";
data/demo_style.py).
part=dpo: configs/recipes/dpo.py:tower=talker on the demo's voice pairs (the spoken reply at its pace chosen
over the same text spoken slowly; data/demo_preference.py), whose codes CODES must hold (the slow clips
encoded into the demo's unit index: `python -m omni_jax.units encode`). Both keep the demo's buckets (the
prompts carry audio and images) and evaluate before the first step and at the end.
"""

import ml_collections

from configs import demo
from configs.recipes import common, dpo, lora

CORPUS = "~/.cache/omni_jax/demo_corpus/jsonl/"


def get_config(arg=None):
  a = common.parse(arg, part="lora")
  if a.part == "lora":
    c = lora.get_config(f"model=tiny,data={CORPUS}style.{{split}}.jsonl")
    # The LM head adapts too: the tiny model's frozen head barely separates the sign-off's words, and with the
    # decoder's projections alone 600 steps only learn to close each reply with "." (measured: 0 of 45 signed).
    c.lora.targets.thinker = list(c.lora.targets.thinker) + ["lm_head"]
    c.train.update(dict(steps=600, lr=5e-3, warmup_steps=10, batch_size=4))
  elif a.part == "dpo":
    c = dpo.get_config(f"model=tiny,tower=talker,data={CORPUS}preference_voice.{{split}}.jsonl")
    c.train.update(dict(steps=60, lr=2e-3, warmup_steps=5, batch_size=4))
    c.dpo.beta = 0.5  # codes are many per reply: a larger beta keeps the margins' scale readable
  else:
    raise ValueError(f"demo_adaptation part {a.part!r}: choose lora or dpo")
  d = demo.get_config().data
  c.data.buckets = d.buckets
  c.eval.update(dict(at_start=True, steps=32, batch_size=4, samples_per_dataset=0))
  if a.part == "dpo":
    # A pair's two spoken replies (the slow one is ~2x longer) take up to ~800 Talker positions (2 x seq_len).
    c.data.buckets = (dict(d.buckets[-1], seq_len=512),)
    c.eval.samples_per_dataset = 64  # one pass over the held-out pairs
  c.train.update(dict(eval_every=c.train.steps, checkpoint_every=c.train.steps, log_every=10))
  c.generate = ml_collections.ConfigDict(demo.get_config().generate.to_dict())
  return c

"""Preference tuning (DPO) of a converted or fine-tuned checkpoint, the Thinker on text replies or the Talker on
spoken replies, with LoRA by default (the reference is then the same model with its adapters off: no second
copy of the weights). Needs --config.init_from and a preference dataset (docs/data.md, "Preference pairs").

  python -m data.demo_preference        # the demo corpus's pairs: ~/.cache/omni_jax/demo_corpus/jsonl/preference.*
  python train.py --config configs/recipes/dpo.py --workdir workdirs/dpo --config.init_from=workdirs/tiny_demo
  python train.py --config configs/recipes/dpo.py:model=7b,data=data/prefs.{split}.jsonl --workdir workdirs/dpo7b \
      --config.init_from=ckpt/omni7b --config.train.batch_size=CHIPS
  python train.py --config configs/recipes/dpo.py:tower=talker,data=... --config.data.speech_codes=CODES ...

Arguments (`:key=value,...`):
  model   tiny (default) | 3b | 7b: the training defaults; the architecture comes with the checkpoint
  tower   thinker (default: objective thinker_dpo, text pairs) | talker (talker_dpo: pairs whose replies are the
          same text spoken two ways; the model config keeps its Talker; replies given as audio need
          --config.data.speech_codes, `python -m omni_jax.units encode --data PREFS`)
  lora    1 (default): adapters on the tower's decoder projections (rank 16 / alpha 32 at 3B and 7B, 8 / 16 tiny),
          the base frozen in bfloat16 | 0: full DPO (the tower trains; the reference is a frozen copy of the
          starting weights, model.reference.<tower>: twice the weights in memory)
  data    the preference JSONL: a file or glob (train split), or a path with `{split}` (train and validation
          files). Default: the demo set that `python -m data.demo_preference` writes.

config.dpo: beta 0.1, sigmoid loss, no label smoothing, at most 8 pairs per row (both replies of a pair in the
same packed row), reference "auto". Metrics: train/<objective>/ rewards, margins and accuracy (omni_jax/dpo.py).
7B: one 8192-token row per chip (--config.train.batch_size = the chip count), every layer rematerialised,
attention_impl="auto".
"""

import ml_collections

from configs.recipes import common

# `python -m data.demo_preference` writes these (docs/data.md, "Preference pairs").
DEMO_PAIRS = "~/.cache/omni_jax/demo_corpus/jsonl/preference.{split}.jsonl"
OBJECTIVES = {"thinker": "thinker_dpo", "talker": "talker_dpo"}


def get_config(arg=None):
  a = common.parse(arg, model="tiny", tower="thinker", lora="1", data=DEMO_PAIRS)
  if a.tower not in OBJECTIVES:
    raise ValueError(f"recipe tower {a.tower!r}: choose one of {sorted(OBJECTIVES)}")
  if a.lora not in ("0", "1"):
    raise ValueError(f"recipe lora {a.lora!r}: 1 (adapters, the default) or 0 (full DPO)")
  tiny = a.model == "tiny"
  c = common.model_config(a.model, talker=a.tower == "talker")
  c.require_init_from = True
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, loss="sigmoid", label_smoothing=0.0, max_pairs_per_row=8,
                                         reference="auto", sft_weight=0.0))
  c.train.objectives = ml_collections.ConfigDict({OBJECTIVES[a.tower]: 1.0})
  if a.lora == "1":
    c.lora = common.lora(a.tower, rank=8 if tiny else 16, alpha=16.0 if tiny else 32.0)
    c.train.freeze = ()  # config.lora freezes every base parameter already
  else:  # full DPO: the tower's own weights train (the Thinker's encoders stay frozen, as in finetune.py)
    c.train.freeze = common.ENCODERS if a.tower == "thinker" else ("thinker",)

  # ---- data: the preference dataset (config.data.preference names the datasets whose records are pairs)
  has_validation = common.jsonl_data(c, "prefs", a.data)
  c.data.preference = ("prefs",)
  # ----

  c.train.weight_decay = 0.0
  if tiny:
    c.train.update(dict(steps=100, batch_size=4, lr=1e-3 if a.lora == "1" else 1e-4, warmup_steps=5, seq_len=256))
    c.eval.batch_size = 4
  else:
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"
    lr = (5e-5 if a.model == "7b" else 1e-4) if a.lora == "1" else 5e-7
    c.train.update(dict(steps=1000, batch_size=8, seq_len=8192, lr=lr, warmup_steps=50, checkpoint_every=250,
                        keep_every=0, eval_every=250))
    c.eval.batch_size = 8
  c.eval.tasks = c.eval.train_tasks = "loss"  # eval/<objective>/ loss, rewards, margins, accuracy
  if not has_validation:
    c.train.eval_every = 0  # a train split only: nothing held out to evaluate
  return c

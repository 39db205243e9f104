"""LoRA fine-tuning of a converted checkpoint: low-rank adapters on every attention and MLP projection of the
Thinker LM (q/k/v/o, gate/up/down), optionally of the Talker too; the base is frozen, held in bfloat16 (or
int8 with quant=int8), carries no optimizer state and is never written to a checkpoint (docs/training.md,
"LoRA and DPO"). Needs --config.init_from.

  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-7B --out_dir ckpt/omni7b --config configs/qwen2_5_omni_7b.py
  python train.py --config configs/recipes/lora.py:model=7b --workdir workdirs/lora7b --config.init_from=ckpt/omni7b \
      --config.train.batch_size=CHIPS
  python train.py --config configs/recipes/lora.py:model=7b,data=data/chat.{split}.jsonl ...   # your JSONL
  python -m omni_jax.aot --config configs/recipes/lora.py:model=7b --topology v6e:1x1 --config.train.batch_size=1

Arguments (`:key=value,...`):
  model   tiny (default) | 3b | 7b: the training defaults; the architecture comes with the checkpoint
  towers  thinker (default) | talker | both: whose decoder projections get adapters. With the Talker the model
          config keeps its Talker, which learns on spoken replies only (`speech` or `codes` on assistant
          messages, docs/data.md; audio replies need --config.data.speech_codes, docs/talker.md)
  quant   int8: the frozen base as int8 weight-only (per output channel, dequantised per matmul): half the
          bf16 base's memory
  data    a JSONL dataset of conversations (docs/data.md): a file or glob (train split), or a path with
          `{split}` (train and validation files). Without it: synthetic text (a smoke run).

Rank 16 / alpha 32 at 3B and 7B (8 / 16 tiny), dropout 0.05, AdamW without weight decay. 7B: one 8192-token
row per chip (--config.train.batch_size = the chip count; grad_accum_steps for more rows a step), every layer
rematerialised, attention_impl="auto" (splash / flash, no L x L scores). Where it fits (AOT, per chip):
docs/training.md ("LoRA and DPO") and docs/performance.md's fit table.
"""

import ml_collections

from configs.recipes import common

OBJECTIVES = {"thinker": {"thinker_text": 1.0}, "talker": {"talker_codes": 1.0},
              "both": {"thinker_text": 1.0, "talker_codes": 1.0}}


def get_config(arg=None):
  a = common.parse(arg, model="tiny", towers="thinker", quant="", data="")
  if a.towers not in OBJECTIVES:
    raise ValueError(f"recipe towers {a.towers!r}: choose one of {sorted(OBJECTIVES)}")
  tiny = a.model == "tiny"
  c = common.model_config(a.model, talker=a.towers != "thinker")
  c.require_init_from = True
  c.lora = common.lora(a.towers, rank=8 if tiny else 16, alpha=16.0 if tiny else 32.0, quant=a.quant)
  c.train.objectives = ml_collections.ConfigDict(OBJECTIVES[a.towers])
  c.train.freeze = ()  # config.lora freezes every base parameter already
  c.train.weight_decay = 0.0
  c.data.synthetic.kinds = ("text",)
  has_validation = common.jsonl_data(c, "sft", a.data) if a.data else True
  if tiny:
    c.train.update(dict(steps=100, lr=2e-3, warmup_steps=5))
  else:
    c.model.remat_policy = "full"
    c.model.attention_impl = "auto"
    c.train.update(dict(steps=2000, batch_size=8, seq_len=8192, lr=1e-4 if a.model == "7b" else 2e-4,
                        warmup_steps=50, checkpoint_every=250, keep_every=0, eval_every=250))
    c.eval.batch_size = 8
  if not has_validation:
    c.train.eval_every = 0  # a train split only: nothing held out to evaluate
  return c

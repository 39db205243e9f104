"""The Thinker's registry entry (omni_jax.towers): typed view of config.model.thinker, constructor, converter
rules of its vision and audio encoders, FLOPs formula, the next-token objective `thinker_text` and the
preference objective `thinker_dpo`.

The objective: next-token cross-entropy over label tokens that never crosses a packed-segment boundary,
summed per modality (omni_jax.batch.KINDS); the step divides the sums by the label count of the whole
global batch (label_mask below), so k micro-batches of b rows give the same update as one batch of k*b rows.

`thinker_dpo` (omni_jax.dpo): DPO / IPO on the pairs of text replies the batch's dpo_pair marks, with each
reply's log-probability summed over the same label tokens, from the same logits, as the text loss; divided by
the number of pairs of the global batch.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from omni_jax import batch as batch_lib
from omni_jax import config as config_lib
from omni_jax import dpo as dpo_lib
from omni_jax import positions as positions_lib
from omni_jax import preference, sizes, towers
from omni_jax.config import ConfigError
from omni_jax.convert.rules import CheckpointMismatch, Rule, dense, transpose
from omni_jax.models.audio import AudioConfig, thinker_audio
from omni_jax.models.thinker import Thinker
from omni_jax.models.vision import VisionConfig, thinker_vision

NUM_KINDS = len(batch_lib.KINDS)
Batch = Mapping[str, jax.Array]


# --------------------------------------------------------------------------------------- config view


@dataclasses.dataclass(frozen=True)
class ThinkerView:
  """config.model.thinker, typed and validated."""
  text: config_lib.TextConfig
  ids: config_lib.TokenIds
  audio: Optional[AudioConfig]
  vision: Optional[VisionConfig]


def view(config: ml_collections.ConfigDict) -> ThinkerView:
  text = config_lib.thinker_text(config)
  ids = config_lib.TokenIds.from_config(config.model.thinker)
  for f in dataclasses.fields(config_lib.TokenIds):
    if f.name.endswith(("_token_id", "_token_ids")):
      values = getattr(ids, f.name)
      for value in values if isinstance(values, tuple) else (values,):
        if not 0 <= value < text.vocab_size:
          raise ConfigError(f"config.model.thinker.{f.name}: {value} is outside the vocabulary "
                            f"(model.thinker.text.vocab_size={text.vocab_size})")
  dpo_lib.validate(config)  # config.dpo, which both towers' DPO objectives read
  return ThinkerView(text, ids, thinker_audio(config), thinker_vision(config))


def build(config: ml_collections.ConfigDict, rt: config_lib.Runtime, rngs) -> Thinker:
  """The Thinker (sizes checked; the token ids against the vocabulary only by view(), at startup: tiny test
  models keep the released ids without using them)."""
  thinker = Thinker(config_lib.thinker_text(config), rt, rngs=rngs, audio=thinker_audio(config),
                    ids=config_lib.TokenIds.from_config(config.model.thinker), vision=thinker_vision(config))
  thinker.loss_layout = LossLayout.from_config(config)  # static: how text_loss applies the LM head
  thinker.dpo = dpo_lib.DpoConfig.from_config(config)  # static: thinker_dpo's settings (None: no DPO)
  return thinker


# --------------------------------------------------------------------------------------- converter rules


def _conv_to_disk(x):
  return np.ascontiguousarray(np.transpose(x, (2, 1, 0)))  # [k, in, out] -> torch Conv1d [out, in, k]


def _patch_embed_shape(config: Optional[ml_collections.ConfigDict], shape: tuple) -> tuple:
  """[out, C*T*p*p] -> the Conv3d weight [out, C, T, p, p] (without a config: the released 3, 2, p layout)."""
  vision = config.model.thinker.get("vision") if config is not None else None
  c, t = (vision.in_channels, vision.temporal_patch_size) if vision is not None else (3, 2)
  p = vision.patch_size if vision is not None else int(round((shape[1] / (c * t)) ** 0.5))
  if sizes.patch_dim(c, t, p) != shape[1]:
    raise CheckpointMismatch(f"patch embedding with {shape[1]} inputs is not (C={c}, T={t}, {p}, {p})")
  return (shape[0], c, t, p, p)


def _conv3d_from_disk(x):
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)  # Conv3d [out, C, T, p, p] -> kernel [C*T*p*p, out]


_AUDIO, _AUDIO_DISK = r"thinker\.audio_tower\.", "thinker.audio_tower."
_VISION, _VISION_DISK = r"thinker\.visual\.", "thinker.visual."
RULES = [
    # Audio tower: the shared Attention names its output projection o_proj and the shared MLP holds fc1/fc2.
    *dense(_AUDIO + r"layers\.self_attn\.o_proj", _AUDIO_DISK + "layers.self_attn.out_proj"),
    *dense(_AUDIO + r"layers\.mlp\.(fc1|fc2)", _AUDIO_DISK + r"layers.\1"),
    Rule(_AUDIO + r"(conv1|conv2)\.kernel", _AUDIO_DISK + r"\1.weight", _conv_to_disk, _conv_to_disk),
    # Vision tower: the shared Attention names q/k/v/proj q_proj/k_proj/v_proj/o_proj; the merger's
    # nn.Sequential indices 0 and 2 are fc1 and fc2; the Conv3d patch embedding is a Linear over patch rows.
    *dense(_VISION + r"blocks\.attn\.(q|k|v)_proj", _VISION_DISK + r"blocks.attn.\1"),
    *dense(_VISION + r"blocks\.attn\.o_proj", _VISION_DISK + "blocks.attn.proj"),
    *dense(_VISION + r"merger\.fc1", _VISION_DISK + "merger.mlp.0"),
    *dense(_VISION + r"merger\.fc2", _VISION_DISK + "merger.mlp.2"),
    Rule(_VISION + r"patch_embed\.proj\.kernel", _VISION_DISK + "patch_embed.proj.weight", transpose,
         _conv3d_from_disk, _patch_embed_shape),
]


# --------------------------------------------------------------------------------------- FLOPs


def _linear_params(d_in: int, d_out: int) -> int:
  return d_in * d_out


class ThinkerFlops:
  """Model FLOPs of one train step of the Thinker, from the host batch (docs/training.md, "MFU").

  Per matmul weight: 2 FLOPs per token forward, 2 for the gradient of its input, 2 for the gradient of the
  weight: 6 when it trains, 4 when it is frozen but something before it trains (the text decoder in stage 1),
  2 when nothing before it needs a gradient (a frozen encoder). Attention adds the score and value matmuls.
  """

  def __init__(self, config: ml_collections.ConfigDict, frozen: frozenset = frozenset(), param_paths: tuple = ()):
    """frozen / param_paths: parameter paths (tuples) frozen by config.train.freeze, and all of them."""
    self.text = config_lib.thinker_text(config)
    self.vision, self.audio = thinker_vision(config), thinker_audio(config)
    t = self.text
    per_layer = (_linear_params(t.hidden_size, t.num_attention_heads * t.head_dim) * 2  # q, o
                 + _linear_params(t.hidden_size, t.num_key_value_heads * t.head_dim) * 2  # k, v
                 + _linear_params(t.hidden_size, t.intermediate_size) * 3)  # gate, up, down
    self.text_matmul_params = t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size  # + lm_head

    def all_frozen(*prefixes):
      under = [p for p in param_paths if p[:2] in [tuple(x.split(".")) for x in prefixes]]
      return bool(under) and all(p in frozen for p in under)

    self.text_factor = 4 if all_frozen("thinker.model", "thinker.lm_head") else 6
    self.vision_factor = 2 if self.vision and (self.vision.freeze or all_frozen("thinker.visual")) else 6
    self.audio_factor = 2 if self.audio and (self.audio.freeze or all_frozen("thinker.audio_tower")) else 6

  def text_flops(self, rows: int, seq_len: int) -> float:
    t = self.text
    tokens = rows * seq_len
    # Causal attention: QK^T and AV each cost 2 * L * heads * head_dim per token forward, halved by the mask.
    attn_fwd = 2 * 2 * seq_len * t.num_attention_heads * t.head_dim / 2
    return tokens * (self.text_factor * self.text_matmul_params + 3 * t.num_hidden_layers * attn_fwd)

  def vision_flops(self, grids: np.ndarray) -> float:
    v = self.vision
    if v is None or grids is None:
      return 0.0
    grids = np.asarray(grids).reshape(-1, 3)
    patches_per_item = np.prod(grids, axis=1).astype(np.float64)
    patches = patches_per_item.sum()
    if patches == 0:
      return 0.0
    block = (_linear_params(v.hidden_size, v.hidden_size) * 4 + _linear_params(v.hidden_size, v.intermediate_size) * 3)
    merger_in = v.hidden_size * v.merge_unit
    merger = _linear_params(merger_in, merger_in) + _linear_params(merger_in, v.out_hidden_size)
    matmul = patches * (v.depth * block + v.patch_dim * v.hidden_size) + patches / v.merge_unit * merger
    window = (v.window_size // v.patch_size) ** 2  # patches per attention window
    full = len(v.fullatt_block_indexes)
    per_patch_attn = 4 * v.hidden_size  # QK^T + AV per key, forward (bidirectional: no halving)
    attn = (v.depth - full) * patches * window * per_patch_attn + full * (patches_per_item ** 2).sum() * per_patch_attn
    return self.vision_factor * matmul + 3 * attn * (self.vision_factor / 6)

  def audio_flops(self, lengths: np.ndarray) -> float:
    a = self.audio
    if a is None or lengths is None:
      return 0.0
    frames = np.asarray(lengths, np.float64).reshape(-1)
    frames = frames[frames > 0]
    if frames.size == 0:
      return 0.0
    tokens = sizes.audio_conv_frames(frames).sum()  # after the stride-2 conv
    d = a.d_model
    layer = _linear_params(d, d) * 4 + _linear_params(d, a.encoder_ffn_dim) * 2
    conv = frames.sum() * 3 * a.num_mel_bins * d + tokens * 3 * d * d
    matmul = tokens * a.encoder_layers * layer + conv + tokens / 2 * d * a.output_dim
    attn = a.encoder_layers * tokens * a.n_window * 4 * d  # block-diagonal per chunk of n_window tokens
    return self.audio_factor * matmul + 3 * attn * (self.audio_factor / 6)

  def step_flops(self, batch: Mapping[str, Any]) -> float:
    rows, seq_len = np.shape(batch["input_ids"])
    total = self.text_flops(rows, seq_len)
    for key in ("image_grid_thw", "video_grid_thw"):
      if key in batch:
        total += self.vision_flops(batch[key])
    if "audio_lengths" in batch:
      total += self.audio_flops(batch["audio_lengths"])
    return float(total)


# --------------------------------------------------------------------------------------- the objective


def _flat(x: Optional[jax.Array]) -> Optional[jax.Array]:
  """[B, N, ...] per-row media -> [B*N, ...] in transformers' row-major item order."""
  return None if x is None else x.reshape((-1,) + x.shape[2:])


def model_inputs(batch: Batch, ids: config_lib.TokenIds) -> tuple[jax.Array, dict]:
  """(positions [3, B, L], media kwargs of Thinker.__call__) from a batch (omni_jax.batch contract)."""
  positions, _ = positions_lib.rope_index(
      batch["input_ids"], ids=ids, image_grid_thw=_flat(batch.get("image_grid_thw")),
      video_grid_thw=_flat(batch.get("video_grid_thw")), second_per_grids=_flat(batch.get("second_per_grids")),
      use_audio_in_video=batch.get("use_audio_in_video", False), segment_ids=batch["segment_ids"])
  media = {}
  if "audio_features" in batch:  # the audio tower takes the batch's audios as one buffer
    media.update(audio_features=_flat(batch["audio_features"]), audio_lengths=_flat(batch["audio_lengths"]))
  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
    if key in batch:  # [B, P, patch_dim] + [B, N, 3]: one buffer per row, sharded over the batch
      media[key] = batch[key]
  return positions, media


def logits_of(thinker: Thinker, batch: Batch) -> jax.Array:
  """Logits [B, L, V] of the Thinker for a batch (call under omni_jax.sharding.activate)."""
  positions, media = model_inputs(batch, thinker.ids)
  return thinker(batch["input_ids"], positions, batch["segment_ids"], **media)


def outputs(thinker: Thinker, batch: Batch) -> dict:
  """The Thinker's forward on a batch: logits, final-norm hidden states, merged input embeddings, positions.
  Shared by the objectives of one batch (omni_jax.towers.shared): the Talker reads hidden states and embeddings."""

  def forward():
    positions, media = model_inputs(batch, thinker.ids)
    embeds = thinker.embed_inputs(batch["input_ids"], **media)
    logits, hidden = thinker(batch["input_ids"], positions, batch["segment_ids"], inputs_embeds=embeds,
                             return_hidden=True)
    return {"logits": logits, "hidden": hidden, "embeds": embeds, "positions": positions}

  return towers.shared("thinker", forward)


def label_mask(batch: Batch) -> jax.Array:
  """[B, L-1] bool: position i is trained to predict labels[i + 1] (same segment, not IGNORE, not padding)."""
  seg = batch["segment_ids"]
  return (batch["labels"][:, 1:] != batch_lib.IGNORE) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)


def token_stats(logits: jax.Array, batch: Batch, with_accuracy: bool = False) -> dict:
  """Per-modality sums over the label tokens of a batch: loss_sum, count (and correct) as [NUM_KINDS]."""
  valid = label_mask(batch)
  targets = jnp.where(valid, batch["labels"][:, 1:], 0)
  return per_kind_sums(logits[:, :-1].astype(jnp.float32), targets, valid, batch["kind"][:, 1:], with_accuracy)


def target_logprobs(logits, targets) -> jax.Array:
  """log p(target) under float32 logits [..., V]: what every loss of the tower takes (the NLL's negative)."""
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def per_kind_sums(logits, targets, valid, kind, with_accuracy: bool = False) -> dict:
  """Cross-entropy sums (and argmax hits) of valid targets per modality `kind`: the objectives' sum format."""
  nll = -target_logprobs(logits, targets)
  onehot = jax.nn.one_hot(kind, NUM_KINDS, dtype=jnp.float32) * valid[..., None]
  out = {"loss_sum": jnp.einsum("bl,blk->k", jnp.where(valid, nll, 0.0), onehot),
         "count": jnp.sum(onehot, axis=(0, 1))}
  if with_accuracy:
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    out["correct"] = jnp.einsum("bl,blk->k", correct, onehot)
  return out


@dataclasses.dataclass(frozen=True)
class LossLayout:
  """How the LM head meets the labels (config.train; docs/training.md "Memory of the loss").

  chunk: positions per chunk of the head + cross-entropy (0: all at once). Each chunk's float32 logits
    [B, chunk, V] live only inside a rematerialised scan step, so the step never holds [B, L, V].
  label_budget: labelled positions per row gathered before the head (0: every position). In SFT data most
    positions carry no label (the prompt, the media), so the 151,936-wide head runs on the budget only; a
    batch with a row over budget takes the every-position path instead (lax.cond), so the loss is always exact.
  """
  chunk: int = 0
  label_budget: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossLayout":
    t = config.get("train", {})
    return cls(int(t.get("loss_chunk_size", 0) or 0), int(t.get("label_budget", 0) or 0))


def _chunked_sums(sums, hidden, targets, valid, extra, chunk: int) -> dict:
  """sums(hidden, targets, valid, *extra) (sums applies the head) over chunks of the length axis, added up:
  [B, T, D] -> sums, never the [B, T, V] logits at once (the sums must be additive over positions)."""
  b, t = targets.shape
  if not chunk or chunk >= t:
    return sums(hidden, targets, valid, *extra)
  n = -(-t // chunk)
  pad = n * chunk - t
  widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  split = lambda x: jnp.moveaxis(widen(x).reshape((b, n, chunk) + x.shape[2:]), 1, 0)  # noqa: E731
  xs = tuple(split(x) for x in (hidden, targets, valid, *extra))

  @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them
  def one(*x):
    return sums(*x)

  def body(total, x):
    return jax.tree.map(jnp.add, total, one(*x)), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(one, *(x[0] for x in xs)))
  return jax.lax.scan(body, zeros, xs)[0]


def head_sums(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout, sums: Callable,
              *extra: jax.Array) -> dict:
  """sums(logits, targets, valid, *extra) over the label positions of a batch (additive over positions), with
  the LM head applied to the final hidden states as `layout` says: logits float32 [B, T, V] of a chunk of
  positions, targets / valid [B, T] (label_mask), extra: per-position fields [B, L-1] aligned with the targets
  (e.g. batch["kind"][:, 1:])."""
  valid = label_mask(batch)
  targets = jnp.where(valid, batch["labels"][:, 1:], 0)
  h = hidden[:, :-1]

  def of_hidden(hid, *rest):
    return sums(thinker.logits(hid).astype(jnp.float32), *rest)

  budget = layout.label_budget
  if not budget or budget >= valid.shape[1]:
    return _chunked_sums(of_hidden, h, targets, valid, extra, layout.chunk)

  def every_position():  # the rare over-budget batch: chunked (budget-sized chunks by default), so that this
    # branch's buffers (lax.cond allocates both) stay as small as the labelled branch's
    return _chunked_sums(of_hidden, h, targets, valid, extra, layout.chunk or budget)

  def labelled_only():
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :budget]  # the labelled positions first, in order
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    return _chunked_sums(of_hidden, take(h), take(targets), take(valid), tuple(take(x) for x in extra),
                         layout.chunk)

  fits = jnp.all(jnp.sum(valid, axis=1) <= budget)
  return jax.lax.cond(fits, labelled_only, every_position)


def hidden_token_stats(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout,
                       with_accuracy: bool = False) -> dict:
  """token_stats from the final hidden states, with the head applied as `layout` says (same sums)."""
  return head_sums(thinker, hidden, batch, layout,
                   lambda logits, y, m, k: per_kind_sums(logits, y, m, k, with_accuracy), batch["kind"][:, 1:])


def text_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """The `thinker_text` objective: next-token cross-entropy of the Thinker (deterministic: rng unused)."""
  del rng
  out = outputs(model.thinker, batch)
  layout = getattr(model.thinker, "loss_layout", LossLayout())
  return hidden_token_stats(model.thinker, out["hidden"], batch, layout, with_accuracy=evaluate)


def num_labels(batch: Batch) -> jax.Array:
  return jnp.sum(label_mask(batch))


def pair_logprobs(thinker: Thinker, hidden: jax.Array, batch: Batch, layout: LossLayout,
                  max_pairs: int) -> preference.PairLogps:
  """Per-row, per-pair sums [B, max_pairs] of the label log-probs of the chosen and rejected replies (the label
  tokens and logits of the text loss; a label belongs to the pair of its own token's dpo_pair)."""

  def sums(logits, y, m, pair):
    return preference.segment_totals(target_logprobs(logits, y), m, pair, max_pairs)

  return preference.split_pairs(head_sums(thinker, hidden, batch, layout, sums, batch["dpo_pair"][:, 1:]))


def dpo_loss(model, batch: Batch, rng: jax.Array, evaluate: bool = False) -> dict:
  """The `thinker_dpo` objective: DPO / IPO sums over the batch's pairs of text replies (omni_jax.dpo), the
  policy's log-probs from the forward the text loss shares, the reference's under stop_gradient."""
  del rng, evaluate
  cfg = dpo_lib.settings(model.thinker)
  if cfg is None or "dpo_pair" not in batch:  # no DPO in this run, or a bucket without pairs
    return preference.zero_sums()
  layout = getattr(model.thinker, "loss_layout", LossLayout())
  policy_out = outputs(model.thinker, batch)
  policy = pair_logprobs(model.thinker, policy_out["hidden"], batch, layout, cfg.max_pairs_per_row)

  def reference(ref):
    hidden = outputs(ref.thinker, batch)["hidden"]
    return pair_logprobs(ref.thinker, hidden, batch, layout, cfg.max_pairs_per_row)

  return cfg.sums(policy, dpo_lib.reference(model, cfg, "thinker_dpo", reference, ("thinker",),
                                            {"thinker": policy_out}))


def num_dpo_pairs(batch: Batch) -> jax.Array:
  """Pairs of text replies (both with label tokens) in the whole (global) batch: thinker_dpo's normaliser."""
  if "dpo_pair" not in batch:
    return jnp.zeros((), jnp.int32)
  return preference.count_pairs(label_mask(batch), batch["dpo_pair"][:, 1:])


TOWER = towers.Tower(
    name="thinker", section="model.thinker", view=view, build=build,
    stacked=("thinker.model.layers", "thinker.audio_tower.layers", "thinker.visual.blocks"),
    rules=tuple(RULES),
    parts={"thinker.visual.": "vision encoder", "thinker.audio_tower.": "audio encoder"},
    flops=ThinkerFlops,
    objectives=(towers.Objective("thinker_text", text_loss, num_labels, metrics=""),
                towers.Objective("thinker_dpo", dpo_loss, num_dpo_pairs, summary=dpo_lib.summary, default=False)))

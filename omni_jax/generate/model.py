"""A loaded model as generation reads it: the split parameters on their mesh and the Thinker's settings.

Every reply decodes in the conversation engine (omni_jax.generate.engine); this handle only carries what the
engine, OmniChat, the sessions and evaluation share: graphdef / params / param_shardings on `mesh`, the rule
table, the special ids, config.generate's defaults (the sampling rule, the reply budget) and the limits on
what a reply may hold (vocab_limit) and how long a conversation may get (context_limit).
"""

import weakref
from typing import Any, Optional

from flax import nnx
from jax.sharding import Mesh

from omni_jax import config as config_lib
from omni_jax import towers
from omni_jax.generate import limits
from omni_jax.generate.sampling import SamplingParams
from omni_jax.models import scan

def decoder_stacks() -> tuple[tuple[str, ...], ...]:
  """The stacks a decode step reads for every token, as key paths: the registered towers' `decoders` (the
  Thinker's and the Talker's decoder layers). The encoders run over many positions at once (compute-bound), so
  their stacks stay scanned: no longer compiles. (The Token2Wav DiT's are the Voicer's to split:
  token2wav.voice.with_layer_buffers.)"""
  return tuple(tuple(path.split(".")) for tower in towers.registered() for path in tower.decoders)


def splits_layers(config, mesh: Mesh) -> bool:
  """config.generate.layer_buffers: "split" holds each decoder layer's weights (decoder_stacks()) as buffers of
  their own (omni_jax.models.scan.split_layers), "stacked" keeps the [layers, ...] arrays, "auto" splits on GPUs, whose
  compiled programs copy a stacked array's slice before each matmul (twice the weight bytes of a decode step);
  a TPU reads the slice in place. A ConfigError names the key for any other value."""
  return scan.splits_on(config.get("generate", {}).get("layer_buffers", "auto"), mesh.devices.flat[0].platform)


class Generator:
  """One model on one mesh, with its generation settings.

  graphdef/params: the split model (params placed by param_shardings on `mesh`; evaluation swaps params between
  calls; the stacked layers' weights held one buffer per layer where config.generate.layer_buffers says so).
  vocab_limit: ids at or past it are never generated (the tokenizer's size: the LM head's rows past it
  are padding no tokenizer can decode; OmniChat sets it from its tokenizer); None: every row of the head.
  context_limit: the most positions, prompt + reply (omni_jax.generate.limits.context_limit of the config).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, config, mesh: Mesh, param_shardings: Any,
               vocab_limit: Optional[int] = None):
    self.graphdef, self.config, self.mesh = graphdef, config, mesh
    self.split_layers = splits_layers(config, mesh)
    self._source = None  # a weak reference to the parameters last given (split once per object)
    self._stacked_shardings, self._split_shardings = param_shardings, None
    self.params = params
    self.rules = tuple(config.sharding_rules)
    self.ids = config_lib.TokenIds.from_config(config.model.thinker)
    self.defaults = dict(config.get("generate", {}))
    self.vocab_limit = None if vocab_limit is None else int(vocab_limit)
    self.context_limit = limits.context_limit(config)

  @property
  def params(self) -> Any:
    """The parameters generation reads: as given, or with the stacks split into per-layer buffers
    (splits_layers), once per parameters object given."""
    return self._params

  @params.setter
  def params(self, params: Any) -> None:
    if params is None:  # dropped (between evaluations): nothing is kept, the next parameters are split again
      self._source = None
    elif self.split_layers and not scan.is_split(params):
      if self._source is not None and self._source() is params:
        return
      self._source = weakref.ref(params)
      params = scan.split_layers(params, decoder_stacks())
    self._params = params

  @property
  def param_shardings(self) -> Any:
    """The shardings of `params` (their per-layer buffers' where the stacks are split)."""
    if self._params is None or not scan.is_split(self._params):
      return self._stacked_shardings
    if self._split_shardings is None:
      self._split_shardings = scan.split_shardings(self._stacked_shardings, self._params)
    return self._split_shardings

  def sampling(self, **overrides) -> SamplingParams:
    """config.generate's rule with the given (non-None) overrides."""
    return SamplingParams.from_config(self.defaults, **overrides)

  def new_tokens(self, max_new_tokens: Optional[int] = None) -> int:
    """A reply's token budget: max_new_tokens, else config.generate.max_new_tokens (256); at least 1."""
    n = int(self.defaults.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens)
    if n < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {n}")
    return n

  def check_context(self, prompt_tokens: int, max_new_tokens: Optional[int] = None) -> None:
    """ContextLengthError unless a prompt of prompt_tokens and its reply fit the model's positions."""
    limits.check_context(prompt_tokens, self.new_tokens(max_new_tokens), limit=self.context_limit)

"""A loaded model as generation reads it: the split parameters on their mesh and the Thinker's settings.

Every reply decodes in the conversation engine (omni_jax.generate.engine); this handle only carries what the
engine, OmniChat, the sessions and evaluation share: graphdef / params / param_shardings on `mesh`, the rule
table, the special ids, config.generate's defaults (the sampling rule, the reply budget) and the limits on
what a reply may hold (vocab_limit) and how long a conversation may get (context_limit).
"""

from typing import Any, Optional

from flax import nnx
from jax.sharding import Mesh

from omni_jax import config as config_lib
from omni_jax.generate import limits
from omni_jax.generate.sampling import SamplingParams


class Generator:
  """One model on one mesh, with its generation settings.

  graphdef/params: the split model (params placed by param_shardings on `mesh`; evaluation swaps params between
  calls). vocab_limit: ids at or past it are never generated (the tokenizer's size: the LM head's rows past it
  are padding no tokenizer can decode; OmniChat sets it from its tokenizer); None: every row of the head.
  context_limit: the most positions, prompt + reply (omni_jax.generate.limits.context_limit of the config).
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, config, mesh: Mesh, param_shardings: Any,
               vocab_limit: Optional[int] = None):
    self.graphdef, self.params, self.config, self.mesh = graphdef, params, config, mesh
    self.param_shardings = param_shardings
    self.rules = tuple(config.sharding_rules)
    self.ids = config_lib.TokenIds.from_config(config.model.thinker)
    self.defaults = dict(config.get("generate", {}))
    self.vocab_limit = None if vocab_limit is None else int(vocab_limit)
    self.context_limit = limits.context_limit(config)

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

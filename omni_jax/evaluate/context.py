"""What every evaluator of one job shares: the config, the mesh, the model's graph and parameter layout, and
(built on first use) one OmniChat with its tokenizer and prompt builder, so the engine's compiled programs are
reused from one evaluation to the next."""

import functools
from typing import Any, Optional, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from omni_jax.evaluate import taskfile
from omni_jax.generate.api import OmniChat
from omni_jax.generate.model import Generator
from omni_jax.input.tokenizer import Tokenizer


class Context:

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef, param_shardings: Any,
               tokenizer_dir: Optional[str] = None):
    self.config, self.mesh, self.graphdef, self.param_shardings = config, mesh, graphdef, param_shardings
    self.rules = config.sharding_rules
    self.split = config.eval.split
    self.tokenizer_dir = tokenizer_dir
    self.primary = jax.process_index() == 0

  @functools.cached_property
  def chat(self) -> OmniChat:
    tokenizer = self.tokenizer_dir or (self.config.get("data", {}) or {}).get("tokenizer")
    generator = Generator(self.graphdef, None, self.config, self.mesh, self.param_shardings)
    return OmniChat(generator, Tokenizer(tokenizer), self.config)

  def generate(self, params: Any, items: Sequence[taskfile.Item], max_new_tokens: int,
               prompts: Optional[Sequence[list]] = None) -> list[str]:
    """Greedy replies to the items' prompts (or to `prompts`, one conversation per item), in item order.

    The prompts share the engine's config.eval.generate_batch_size slots (continuous batching: a slot freed by
    a short reply takes the next prompt). Greedy decoding without a repetition penalty: the reply depends on
    the parameters only.
    """
    conversations = list(prompts) if prompts is not None else [i.messages for i in items]
    chat = self.chat
    chat.generator.params = params
    size = int(self.config.eval.get("generate_batch_size", 8))
    return chat.chat_batch(conversations, slots=size, max_new_tokens=max_new_tokens, do_sample=False,
                           repetition_penalty=1.0)

  def decode(self, ids) -> str:
    """A reply's text: stop ids, and ids past the tokenizer's (the embedding table's padding rows, which an
    untrained model may pick), have no text."""
    chat = self.chat
    vocab = chat.tokenizer.vocab_size
    return chat.tokenizer.decode([int(i) for i in ids if int(i) not in chat.stop_ids and int(i) < vocab])

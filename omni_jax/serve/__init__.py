"""Serving: a real-time omni session (chunked input, streamed text, speech codes and audio) and its events."""

from omni_jax.serve.events import Done, Event
from omni_jax.serve.session import OmniSession

__all__ = ["Done", "Event", "OmniSession"]

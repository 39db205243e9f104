"""The errors a user's input can cause, importable from anywhere (no jax, no project imports).

UserError is the base of every error that means "the input is wrong", not "the code is wrong": the entry
points (omni_jax.cli) print its message as one line and exit with status 2, and any other exception keeps its
traceback. ConfigError lives here because every floor of the library raises it, from layers up.
"""


class UserError(Exception):
  """Bad input from the user (config, data, checkpoint, tokenizer, media); the message names what is wrong."""


class ConfigError(UserError, ValueError):
  """A configuration value is missing or inconsistent; the message names the key."""

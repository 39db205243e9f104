"""What the entry points (train.py, eval.py, generate.py, `python -m omni_jax.convert`) do with a user's mistake:
one `error: ...` line on stderr and exit status 2 (USER_ERROR), instead of a traceback.

User errors are omni_jax.errors.UserError (the base of the project's own exception types for bad input:
config, data, checkpoints, converter inputs, tokenizer files, a prompt's media) and files that do not exist;
any other exception is a bug and keeps its traceback. Flag parsing goes through parse_flags, so a misspelled
`--config.x.y` key is named with the closest existing key (difflib).
"""

import contextlib
import difflib
import sys
from typing import Callable, Iterator, Optional, Sequence

from omni_jax.errors import UserError

USER_ERROR = 2  # exit status of a user error (argparse's, too)
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)


def one_line(e: BaseException) -> str:
  """`error: <message>` on one line, whatever the message holds."""
  return "error: " + " ".join(str(e).split())


def fail(message: str) -> None:
  """Print one error line and exit with USER_ERROR."""
  print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
  raise SystemExit(USER_ERROR)


@contextlib.contextmanager
def user_errors(also: Sequence[type] = ()) -> Iterator[None]:
  """Turn a user error raised inside into one line and exit status 2; `also`: more types that count as such."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - only user errors are caught; the rest re-raises with its traceback
    if not isinstance(e, USER_ERRORS + tuple(also)):
      raise
    fail(str(e))


# ---------------------------------------------------------------------------------------------------------
# Flags (absl + ml_collections config_flags).


def _config_file_arg(argv: Sequence[str], name: str) -> Optional[str]:
  for i, arg in enumerate(argv):
    for prefix in (f"--{name}", f"-{name}"):
      if arg == prefix and i + 1 < len(argv):
        return argv[i + 1]
      if arg.startswith(prefix + "="):
        return arg[len(prefix) + 1:]
  return None


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted keys of the `--<name>.a.b=value` / `--<name>.a.b value` overrides, in order."""
  out = []
  for arg in argv:
    for prefix in (f"--{name}.", f"-{name}."):
      if arg.startswith(prefix):
        out.append(arg[len(prefix):].split("=", 1)[0])
  return out


def unknown_key(config, path: str, root: str = "config") -> Optional[str]:
  """Why `root.path` names no field of config (with the closest existing key), or None when it does."""
  node, walked = config, [root]
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else None
    if keys is None:
      return f"{'.'.join(walked)} is a {type(node).__name__} value, it has no field {part!r}"
    if part in keys:
      node = node[part]
      walked.append(part)
      continue
    close = difflib.get_close_matches(part, [str(k) for k in keys], n=1, cutoff=0.6)
    where = ".".join(walked)
    hint = f"did you mean {where}.{close[0]}?" if close else f"{where} has: {', '.join(sorted(map(str, keys)))}"
    return f"{where}.{part} is not a config key; {hint}"
  return None


def _explain_override_error(argv: Sequence[str], name: str) -> Optional[str]:
  """The first `--<name>.key` override of argv that names no field of the config file, explained."""
  from absl import flags  # local: only entry points parse flags

  path = _config_file_arg(argv, name)
  if path is None or name not in flags.FLAGS:
    return None
  try:
    config = flags.FLAGS[name].parser.parse(path)
  except Exception:  # noqa: BLE001 - the config file itself is broken: the original error says more
    return None
  for key in _overrides(argv, name):
    problem = unknown_key(config, key, name)
    if problem:
      return problem
  return None


def parse_flags(argv: Sequence[str], config_flag: str = "config") -> list[str]:
  """absl's flag parsing, with bad flags as one error line and exit status 2 (a misspelled config key says
  which key comes closest)."""
  from absl import flags  # local: only entry points parse flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:  # config_flags: an override naming no config field
    message = _explain_override_error(argv, config_flag)
    if message is None:
      raise
    fail(message)
  raise AssertionError("unreachable")


def run(main: Callable, also: Sequence[type] = ()) -> None:
  """absl.app.run(main) for an entry point: flags through parse_flags, user errors from main as one line."""
  from absl import app  # local: only entry points run through absl

  def guarded(argv):
    with user_errors(also):
      return main(argv)

  app.run(guarded, flags_parser=parse_flags)

"""Shared fixtures: the demo corpus, built once per test session into a temporary folder (a few seconds); and
the order in which the files run."""

import gc
import os

import pytest

# The files that take minutes in one process (a whole training run in a module fixture or a subprocess) run
# first, so that the two xdist workers (run.sh test: --dist loadfile --no-loadscope-reorder) finish together
# instead of one of them starting the longest file last. The --durations list in every CI log says which.
LONGEST_FIRST = ("test_demo_learns.py", "test_new_voice.py", "test_token2wav_training.py",
                 "test_reliability_multiprocess.py", "test_attention_impls.py", "test_reliability_data.py",
                 "test_talker_training.py", "test_server_hostile.py", "test_session.py", "test_dpo.py",
                 "test_lora.py", "test_dpo_runs.py", "test_engine.py", "test_accelerator_suite.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: file order kept


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Frees every compiled program when a test file ends (this fixture is set up first, so torn down last).

  Each XLA:CPU executable holds memory mappings of its own (code and constants), and a worker process runs dozens
  of files: a few files of model programs add tens of thousands of mappings, and past the kernel's limit
  (vm.max_map_count, 65530 by default) the compiler's next mmap fails and the process dies in XLA (a segfault
  or an abort). The persistent compilation cache (run.sh test) makes compiling a program again in a later file
  a disk read.
  """
  yield
  import jax

  gc.collect()  # the file's models and engines, and the jitted functions they hold
  jax.clear_caches()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """The demo corpus, built once per session; importing data.demo_corpus registers config.data.source = "demo"."""
  from data import demo_corpus

  out = tmp_path_factory.mktemp("demo") / "corpus"
  demo_corpus.build(str(out))
  return str(out)


@pytest.fixture(scope="session")
def tiny_speech_checkpoint(tmp_path_factory):
  """The tiny model with a Talker, a small Token2Wav and two voices, saved once per session (serve_testlib)."""
  import serve_testlib

  return serve_testlib.make_checkpoint(str(tmp_path_factory.mktemp("speech_ckpt")))

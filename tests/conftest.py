"""Shared fixtures: the demo corpus, built once per test session into a temporary folder (a few seconds)."""

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  from data import demo_corpus

  out = tmp_path_factory.mktemp("demo") / "corpus"
  demo_corpus.build(str(out))
  return str(out)


@pytest.fixture(scope="session")
def tiny_speech_checkpoint(tmp_path_factory):
  """The tiny model with a Talker, a small Token2Wav and two voices, saved once per session (serve_testlib)."""
  import serve_testlib

  return serve_testlib.make_checkpoint(str(tmp_path_factory.mktemp("speech_ckpt")))

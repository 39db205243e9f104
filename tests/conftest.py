"""Shared fixtures: the demo corpus, built once per test session into a temporary folder (a few seconds)."""

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  from data import demo_corpus

  out = tmp_path_factory.mktemp("demo") / "corpus"
  demo_corpus.build(str(out))
  return str(out)

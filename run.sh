#!/usr/bin/env bash
# The two commands of the README; each sets up the project-local virtual environment (.venv) if needed.
#   bash run.sh main   train the tiny model on the embedded demo corpus, then evaluate it
#   bash run.sh test   run the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

setup() {  # $1: pip extras ("" or "test")
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.omni_jax-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-${1:-base}"
  if [ ! -f "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".${1:+[$1]}"
    .venv/bin/pip install -q --no-deps "dashscope>=1.20,<3"  # only for its qwen.tiktoken data file
    touch "$stamp"
  fi
}

case "${1:-}" in
  main)
    setup ""
    workdir="${WORKDIR:-workdirs/tiny_demo}"
    .venv/bin/python train.py --config configs/tiny.py --config.data.source=demo --workdir "$workdir"
    .venv/bin/python eval.py --config configs/tiny.py --config.data.source=demo --checkpoint "$workdir"
    ;;
  test)
    setup test
    .venv/bin/python -m pytest -q
    ;;
  *)
    echo "usage: bash run.sh main|test" >&2
    exit 2
    ;;
esac

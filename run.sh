#!/usr/bin/env bash
# The two commands of the README; each sets up the project-local virtual environment (.venv) if needed.
#   bash run.sh main   train the tiny model on the embedded demo corpus, evaluate it, ask it
#   bash run.sh test   run the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

setup() {  # $1: pip extras ("" or "test")
  [ -x .venv/bin/python ] || python3 -m venv .venv
  local stamp=".venv/.omni_jax-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-${1:-base}"
  if [ ! -f "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    bpe_ranks
    # Earlier set-ups installed dashscope itself: its missing dependencies made pip print an ERROR each time.
    if .venv/bin/pip show -q dashscope >/dev/null 2>&1; then .venv/bin/pip uninstall -q -y dashscope; fi
    .venv/bin/pip install -q -e ".${1:+[$1]}"
    touch "$stamp"
  fi
}

gpu_aot() {  # jax's CUDA plugin (no CUDA libraries) beside .venv, off its path: XLA:GPU compiles for GPUs
  # without one (omni_jax.aot, tests/test_aot.py). Installed into .venv it would make every jax start on a
  # machine without a GPU print the plugin's failed CUDA checks.
  local version dest=.venv/gpu-aot
  version=$(.venv/bin/python -c "import jaxlib; print(jaxlib.__version__)")
  [ -f "$dest/.jaxlib-$version" ] && return 0
  rm -rf "$dest"
  if .venv/bin/pip install -q --no-deps --target "$dest" "jax-cuda13-plugin==$version" "jax-cuda13-pjrt==$version"; then
    touch "$dest/.jaxlib-$version"
  else
    echo "run.sh: jax's CUDA plugin $version could not be installed; the XLA:GPU compile test will skip" >&2
  fi
}

bpe_ranks() {  # qwen.tiktoken (the offline BPE ranks) out of the dashscope wheel, which is not installed
  local dest=.venv/share/omni_jax/qwen.tiktoken  # omni_jax.input.tokenizer.RANKS_FILE
  [ -s "$dest" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --no-deps "dashscope>=1.20,<3" -d "$tmp"
  .venv/bin/python - "$dest" "$tmp"/dashscope-*.whl <<'EOF'
import os, sys, zipfile
dest, wheel = sys.argv[1:3]
os.makedirs(os.path.dirname(dest), exist_ok=True)
with zipfile.ZipFile(wheel) as z:
  data = z.read("dashscope/resources/qwen.tiktoken")
with open(dest + ".part", "wb") as f:
  f.write(data)
os.replace(dest + ".part", dest)
EOF
  rm -rf "$tmp"
}

case "${1:-}" in
  main)
    setup eval  # eval: the speech evaluator's offline judges (pocketsphinx, resemblyzer), its last step
    workdir="${WORKDIR:-workdirs/tiny_demo}"
    # configs/demo.py: the tiny model on the demo corpus for 200 steps, evaluated untrained (step 0), at step 100
    # and at the end (held-out loss + spoken digits); one grain worker decodes media while the step computes.
    demo=(--config configs/demo.py --config.data.source=demo --config.data.worker_count=1)
    # Speech units for the Talker: k-means over the tiny Thinker's own audio tower (its seeded init, the weights
    # training starts from), fitted once on the spoken replies; every spoken reply encoded into a codes index.
    corpus="$HOME/.cache/omni_jax/demo_corpus"
    .venv/bin/python -c 'from data import demo_corpus; demo_corpus.ensure()'
    units="$workdir/units"
    [ -f "$units/units.json" ] || .venv/bin/python -m omni_jax.units fit --config configs/demo.py \
      --data "$corpus/jsonl/speech.train.jsonl" --vocab_size 64 --out "$units"
    .venv/bin/python -m omni_jax.units encode --units "$units" --data "$corpus/jsonl/speech.*.jsonl" \
      --out "$units/codes.json"
    demo+=(--config.data.speech_codes="$units/codes.json")
    .venv/bin/python train.py "${demo[@]}" --workdir "$workdir"
    # The DiT (Token2Wav) on the same units: flow matching on the spoken replies' (codes, target mel, a clip of the
    # speaker), starting from the main checkpoint with the Thinker and Talker frozen (configs/demo_token2wav.py),
    # so $workdir/token2wav holds all three towers.
    .venv/bin/python train.py --config configs/demo_token2wav.py --config.data.source=demo \
      --config.data.speech_codes="$units/codes.json" --config.init_from="$workdir" --workdir "$workdir/token2wav"
    # Its voice: the spoken replies are one eSpeak voice, trained as the Talker's default speaker (Chelsie). One
    # of its clips, as training conditioned on it, goes into $workdir/token2wav/speakers.safetensors, where
    # generate.py --speak, chat.py and the server find the voice (omni_jax/token2wav/new_voice.py, "voices").
    .venv/bin/python -m omni_jax.token2wav.new_voice voices --checkpoint "$workdir/token2wav" \
      --clip "$corpus/media/speech/a000.wav"
    # Spoken replies from all three towers: the held-out voice-chat prompts answered in text, Talker codes and
    # audio; pocketsphinx's transcript of the audio vs the reply's text (WER) and resemblyzer's similarity to the
    # voice's clip, beside the judges' own scores on the task's recordings (judge_wer, judge_similarity).
    .venv/bin/python eval.py --config configs/demo_token2wav.py --config.data.source=demo \
      --config.data.speech_codes="$units/codes.json" --config.eval.tasks=speech --checkpoint "$workdir/token2wav"
    # Last, every other evaluator on the main checkpoint: the table sets it beside the untrained step 0, then one
    # reply per modality to a held-out prompt.
    .venv/bin/python eval.py "${demo[@]}" --checkpoint "$workdir"
    # Ask the trained model about a held-out clip: a digit spoken by a voice it never heard (the reply streams).
    clip=$(ls "$HOME"/.cache/omni_jax/demo_corpus/media/digits/digit7_en-US-nyc_0.wav 2>/dev/null | head -n 1)
    .venv/bin/python generate.py --checkpoint "$workdir" --prompt "Which digit is spoken?" \
      ${clip:+--audio "$clip"} --max_new_tokens 8 --greedy
    # And a spoken reply from all three towers: text, speech codes and a 24 kHz WAV (Griffin-Lim: the tiny
    # BigVGAN is untrained; at most 256 codes, configs/demo.py), written into the workdir.
    .venv/bin/python generate.py --checkpoint "$workdir/token2wav" --prompt "How do I make tea?" --speak \
      --wav_out "$workdir/reply.wav" --codes_out "$workdir/reply.codes.json"
    ;;
  test)
    setup test,tpu,serve,eval  # tpu: libtpu for the AOT tests (tests/test_aot.py); serve: tests/test_server.py; eval: the speech judges
    gpu_aot
    # The realtime page's browser test (tests/test_realtime_page.py) drives Debian's Chromium through chromedriver.
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
      sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
      apt_log=$(mktemp)
      { $sudo apt-get update -q \
          && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
        >"$apt_log" 2>&1 || { tail -n 20 "$apt_log" >&2; echo "run.sh: installing chromium failed" >&2; }
      rm -f "$apt_log"
    fi
    # Two workers, one test file each at a time (module fixtures stay in one process): XLA compiles, most of
    # the suite's time, are mostly single-threaded, so a 2-core machine runs two files at once. Files run in
    # collection order, the longest first (tests/conftest.py LONGEST_FIRST).
    # One persistent XLA compilation cache for the run (both workers and every process the tests start): the
    # tests build the same tiny programs again and again (train steps in subprocesses, the same model in several
    # files), so most compiles become cache reads. A fresh folder each run, removed at the end.
    JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t omni_jax_xla_cache.XXXXXX)"
    export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
    trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
    # --durations: the slowest tests in every log, to keep the suite inside its 40 minutes.
    # --max-worker-restart=0: a worker that dies fails the run at once (xdist gives a replaced worker no work).
    .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --durations=25
    ;;
  *)
    echo "usage: bash run.sh main|test" >&2
    exit 2
    ;;
esac

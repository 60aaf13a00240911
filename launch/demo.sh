#!/usr/bin/env bash
# Builds pipequant, writes a small synthetic Llama and token files, quantizes it with GPTQ 4-bit,
# evaluates the original and the quantized model and shows what was written.
# PIPEQUANT_DEMO_DIR=DIR uses DIR as the work directory (default: a new temporary directory, kept at the end).
# PIPEQUANT_DEMO_NP=N runs the quantize step on N ranks (default 1). Extra arguments go to build.sh (cmake).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${PIPEQUANT_BUILD_DIR:-$REPO/build}"
PQ="$BUILD_DIR/pipequant"
NP="${PIPEQUANT_DEMO_NP:-1}"
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

STEP="build"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo; echo "demo: FAILED in step: $STEP (exit $rc)" >&2; fi' EXIT

section() {
  STEP="$1"
  echo
  echo "================================================================"
  echo "== $1"
  echo "================================================================"
}
run() { echo "+ $*"; "$@"; }

section "build"
"$REPO/launch/build.sh" "$@"

if [ -n "${PIPEQUANT_DEMO_DIR:-}" ]; then
  W="$PIPEQUANT_DEMO_DIR"
  mkdir -p "$W"
else
  W="$(mktemp -d "${TMPDIR:-/tmp}/pipequant-demo.XXXXXX")"
fi
echo "demo: work directory $W"
# a rerun in the same directory starts over
rm -rf "$W/model" "$W/q4" "$W/calib.npy" "$W/eval.npy"

section "synthetic checkpoint (4 blocks, hidden 256, bf16)"
run "$PQ" synth --out "$W/model" --hidden-size 256 --intermediate-size 688 --num-layers 4 --num-heads 8 \
  --num-kv-heads 4 --vocab-size 1024 --dtype bf16 --seed 1

section "calibration and evaluation tokens"
run "$PQ" synth-tokens --out "$W/calib.npy" --count 20000 --vocab-size 1024 --seed 2
run "$PQ" synth-tokens --out "$W/eval.npy" --count 20000 --vocab-size 1024 --seed 3

section "quantize: GPTQ 4-bit, group 128, $NP rank(s)"
run "$REPO/launch/pq_mpirun.sh" -np "$NP" "$PQ" quantize --model "$W/model" --calib "$W/calib.npy" --seq-len 128 \
  --nsamples 64 --method gptq --bits 4 --group-size 128 --out "$W/q4"

section "perplexity of the original model"
run "$PQ" eval --model "$W/model" --tokens "$W/eval.npy" --seq-len 128

section "perplexity of the quantized model"
run "$PQ" eval --model "$W/model" --quantized "$W/q4" --tokens "$W/eval.npy" --seq-len 128

section "inspect the output"
run "$PQ" inspect "$W/q4"

STEP="done"
echo
echo "demo: done; outputs in $W"

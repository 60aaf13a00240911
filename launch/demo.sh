#!/usr/bin/env bash
# Builds pipequant and quantizes a real model, stories260K (models/stories260K: a 260K-parameter Llama trained on
# TinyStories), to 4 bits with GPTQ, RTN and AWQ; evaluates the original and the three outputs on held-out
# TinyStories text and prints a table; exports the GPTQ output as a Hugging Face GPTQ checkpoint and checks that
# the checkpoint evaluates to the same perplexity; inspects the GPTQ output. About 15 s on 2 cores after the build.
# PIPEQUANT_DEMO_DIR=DIR uses DIR as the work directory (default: a new temporary directory, kept at the end).
# PIPEQUANT_DEMO_NP=N runs the quantize steps on N ranks (default 1).
# PIPEQUANT_SKIP_BUILD=1 uses the binary in PIPEQUANT_BUILD_DIR (default build/) as it is, without build.sh.
# Extra arguments go to build.sh (cmake).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${PIPEQUANT_BUILD_DIR:-$REPO/build}"
PQ="$BUILD_DIR/pipequant"
NP="${PIPEQUANT_DEMO_NP:-1}"
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# The demo's model is tiny: its parallel regions last microseconds, and OpenMP workers that spin between them
# instead of sleeping take the cores from everything else (4x the wall time on a busy 2-core machine)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

MODEL="$REPO/models/stories260K"
CALIB="$MODEL/tokens/tinystories_calib.tok512.npy"
EVAL="$MODEL/tokens/tinystories_eval.tok512.npy"
SEQ_LEN=256
BITS=4
GROUP=32
METHODS=(gptq rtn awq)

STEP="build"
# shellcheck disable=SC2154 # rc is assigned inside the trap
trap 'rc=$?; if [ $rc -ne 0 ]; then echo; echo "demo: FAILED in step: $STEP (exit $rc)" >&2; fi' EXIT

section() {
  STEP="$1"
  echo
  echo "================================================================"
  echo "== $1"
  echo "================================================================"
}
run() { echo "+ $*"; "$@"; }

# perplexity NAME ARGS...: runs `eval ARGS...`, shows its output and keeps its "perplexity: X" value in PPL[NAME]
declare -A PPL
perplexity() {
  local name="$1"
  shift
  run "$PQ" eval --tokens "$EVAL" --seq-len "$SEQ_LEN" "$@" | tee "$W/eval-$name.log"
  PPL[$name]="$(sed -n 's/^perplexity: //p' "$W/eval-$name.log")"
  if [ -z "${PPL[$name]}" ]; then
    echo "demo: no 'perplexity:' line in the output of eval ($name)" >&2
    return 1
  fi
}

section "build"
if [ "${PIPEQUANT_SKIP_BUILD:-0}" = "1" ]; then
  echo "build: skipped (PIPEQUANT_SKIP_BUILD=1); using $PQ"
  [ -x "$PQ" ] || { echo "demo: no pipequant binary at $PQ (build it, or unset PIPEQUANT_SKIP_BUILD)" >&2; exit 1; }
else
  "$REPO/launch/build.sh" "$@"
fi

if [ -n "${PIPEQUANT_DEMO_DIR:-}" ]; then
  W="$PIPEQUANT_DEMO_DIR"
  mkdir -p "$W"
else
  W="$(mktemp -d "${TMPDIR:-/tmp}/pipequant-demo.XXXXXX")"
fi
W="$(cd "$W" && pwd)"
echo "demo: work directory $W"
# a rerun in the same directory starts over
rm -rf "${METHODS[@]/#/$W/}" "$W/gptq-hf" "$W"/eval-*.log

section "the model: stories260K"
echo "$MODEL: a Llama trained on TinyStories (llama2.c, MIT licence; see its README.md)"
echo "  5 blocks, hidden 64, intermediate 172, 8 query / 4 key-value heads, vocabulary 512, float32"
echo "calibration: $CALIB (5,434 tokens)"
echo "evaluation:  $EVAL (10,092 tokens, other stories)"

section "perplexity of the original model (float32)"
perplexity fp --model "$MODEL"

for m in "${METHODS[@]}"; do
  section "quantize: ${m^^} $BITS-bit, group $GROUP, $NP rank(s)"
  run "$REPO/launch/pq_mpirun.sh" -np "$NP" "$PQ" quantize --model "$MODEL" --calib "$CALIB" --seq-len "$SEQ_LEN" \
    --method "$m" --bits "$BITS" --group-size "$GROUP" --out "$W/$m"
done

for m in "${METHODS[@]}"; do
  section "perplexity of the ${m^^} output (dequantized on the fly)"
  perplexity "$m" --model "$MODEL" --quantized "$W/$m"
done

section "results: perplexity on held-out TinyStories text (lower is better)"
printf '%-8s %5s %6s %12s %10s\n' method bits group perplexity "vs fp32"
printf '%-8s %5s %6s %12s %10s\n' fp32 32 - "${PPL[fp]}" -
for m in "${METHODS[@]}"; do
  change="$(awk -v q="${PPL[$m]}" -v f="${PPL[fp]}" 'BEGIN { printf "%+.2f%%", 100 * (q / f - 1) }')"
  printf '%-8s %5s %6s %12s %10s\n' "$m" "$BITS" "$GROUP" "${PPL[$m]}" "$change"
done

# Only the GPTQ output is exported: the AWQ checkpoint format needs every linear's input width to be a multiple
# of the group size, and stories260K's down_proj is 172 = 4 x 43 wide, so an AWQ export of this model would
# need group size 4. GPTQ checkpoints allow a shorter last group.
section "export the GPTQ output as a Hugging Face GPTQ checkpoint"
run "$PQ" export "$W/gptq" --to "$W/gptq-hf" --format gptq
run ls -l "$W/gptq-hf"
run cat "$W/gptq-hf/quantize_config.json"

section "perplexity of the exported GPTQ checkpoint"
perplexity gptq-hf --model "$W/gptq-hf"
if [ "${PPL[gptq-hf]}" != "${PPL[gptq]}" ]; then
  echo "demo: the exported checkpoint's perplexity ${PPL[gptq-hf]} differs from the GPTQ output's ${PPL[gptq]}" >&2
  exit 1
fi
echo "export: perplexity ${PPL[gptq-hf]} = the GPTQ output's ${PPL[gptq]}: the checkpoint holds the same weights"

section "inspect the GPTQ output"
run "$PQ" inspect "$W/gptq"

STEP="done"
echo
echo "demo: stories260K, $BITS-bit, group $GROUP: perplexity fp32 ${PPL[fp]}, gptq ${PPL[gptq]}," \
  "rtn ${PPL[rtn]}, awq ${PPL[awq]}; exported GPTQ checkpoint ${PPL[gptq-hf]}"
echo "demo: done in ${SECONDS} s; outputs in $W (gptq/ rtn/ awq/: pipequant outputs; gptq-hf/: Hugging Face GPTQ)"

#!/usr/bin/env bash
# Compares pipequant's GPTQ on single linear layers with the GPTQ paper's reference implementation
# (scripts/gptq_reference.py: IST-DASLab/gptq transcribed to PyTorch float32 on the CPU): the relative
# output error ||W X^T - Q X^T||_F^2 / ||W X^T||_F^2 of each, and the time of the solve alone (the Hessian
# is accumulated before the clock starts, as the paper measures), both on the same number of threads.
# Prints a markdown table on stdout; progress goes to stderr. See docs/reference_comparison.md.
#
#   scripts/compare_layer_reference.sh [options] [SHAPE ...]       SHAPE = OUTxIN, e.g. 4096x11008
#     --threads T       threads for both (default: all cores)
#     --bits B          (default 4)
#     --group-size G    (default 128)
#     --sym --act-order --static-groups   passed to both
#     --tokens N        rows of X (default max(2048, in))
#     --seed S          seed of the synthetic layers (default 0; the shape is mixed in, so a shape gets
#                       the same layer whatever the list)
#     --bin PATH        the pipequant binary (default build/pipequant)
#     --work DIR        where W.npy, X.npy and the .h5 go (default: a temporary directory, removed at the end)
#     --output FILE     also write the table to FILE
# Default shapes: 1024x1024 4096x4096 4096x11008 (or the SHAPES environment variable, space separated).
# PYTHON selects the interpreter that has torch (default /usr/bin/python3, Debian's python3-torch).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-/usr/bin/python3}"
THREADS="$(nproc 2>/dev/null || echo 1)"
BITS=4
GROUP=128
TOKENS=0
SEED=0
BIN="$REPO/build/pipequant"
WORK=""
OUTPUT=""
FLAGS=()
SHAPE_LIST=()

die() { echo "compare_layer_reference: $*" >&2; exit 2; }
log() { echo "compare_layer_reference: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --bits) BITS="$2"; shift 2 ;;
    --group-size) GROUP="$2"; shift 2 ;;
    --tokens) TOKENS="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --sym | --act-order | --static-groups) FLAGS+=("$1"); shift ;;
    -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) SHAPE_LIST+=("$1"); shift ;;
  esac
done
if [ "${#SHAPE_LIST[@]}" -eq 0 ]; then read -r -a SHAPE_LIST <<<"${SHAPES:-1024x1024 4096x4096 4096x11008}"; fi
for s in "${SHAPE_LIST[@]}"; do [[ "$s" =~ ^[0-9]+x[0-9]+$ ]] || die "shape '$s': expected OUTxIN such as 4096x11008"; done
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads: expected a positive number, got '$THREADS'"
[ -x "$BIN" ] || die "no pipequant binary at $BIN: build it with launch/build.sh (or give --bin)"
"$PYTHON" -c "import torch" 2>/dev/null || die "$PYTHON cannot import torch: apt-get install python3-torch (or set PYTHON)"

if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/pq-refcmp.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"

# the same threads for both: torch/OpenBLAS/OpenMP in the reference, OpenMP/OpenBLAS in pipequant
export OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

field() { # field NAME FILE: the value of the last "NAME: value" line
  awk -v k="$1:" '$1 == k {v = $2} END {if (v != "") print v; else exit 1}' "$2"
}

rows=()
status=0
for shape in "${SHAPE_LIST[@]}"; do
  dir="$WORK/$shape"
  mkdir -p "$dir"
  log "$shape: generating W and X"
  tok_args=()
  if [ "$TOKENS" -gt 0 ]; then tok_args=(--tokens "$TOKENS"); fi
  out_f="${shape%x*}" in_f="${shape#*x}"
  "$PYTHON" "$REPO/scripts/make_layer_inputs.py" --shape "$shape" --out-dir "$dir" \
    --seed $((SEED * 1000003 + out_f * 100003 + in_f)) "${tok_args[@]}" >&2

  log "$shape: reference ($THREADS threads)"
  ref_err="failed" ref_s="failed" pq_err="failed" pq_s="failed"
  if "$PYTHON" "$REPO/scripts/gptq_reference.py" --weight "$dir/W.npy" --inputs "$dir/X.npy" --bits "$BITS" \
    --group-size "$GROUP" --threads "$THREADS" --no-rtn "${FLAGS[@]}" >"$dir/ref.log" 2>&1; then
    ref_err="$(field relative_error "$dir/ref.log" || echo missing)"
    ref_s="$(field solve_seconds "$dir/ref.log" || echo missing)"
  else
    status=1
    log "$shape: the reference failed:"; tail -n 20 "$dir/ref.log" >&2
  fi

  log "$shape: pipequant layer ($THREADS threads)"
  rm -f "$dir/layer.h5"
  if "$BIN" layer --weight "$dir/W.npy" --inputs "$dir/X.npy" --bits "$BITS" --group-size "$GROUP" \
    --threads "$THREADS" --out "$dir/layer.h5" "${FLAGS[@]}" >"$dir/pq.log" 2>&1; then
    pq_err="$(field relative_error "$dir/pq.log" || echo missing)"
    pq_s="$(field solve_seconds "$dir/pq.log" || echo missing)"
  else
    status=1
    log "$shape: pipequant failed:"; tail -n 20 "$dir/pq.log" >&2
  fi
  log "$shape: reference error $ref_err in $ref_s s, pipequant error $pq_err in $pq_s s"
  rows+=("$shape $ref_err $pq_err $ref_s $pq_s")
done

{
  cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)"
  torch_v="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"
  rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "GPTQ ${BITS}-bit, group ${GROUP}${FLAGS[*]:+, ${FLAGS[*]}}; $THREADS threads on ${cpu:-this CPU}; reference: PyTorch $torch_v float32; pipequant $rev"
  echo
  echo "| shape (out x in) | ref error | pipequant error | error ratio (pq/ref) | ref seconds | pipequant seconds | speedup (ref/pq) |"
  echo "|---|---|---|---|---|---|---|"
  for r in "${rows[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    awk -v shape="$1" -v re="$2" -v pe="$3" -v rs="$4" -v ps="$5" 'BEGIN {
      num = "^[-+]?[0-9.]+([eE][-+]?[0-9]+)?$"
      ratio = (re ~ num && pe ~ num && re + 0 > 0) ? sprintf("%.3f", pe / re) : "-"
      speed = (rs ~ num && ps ~ num && ps + 0 > 0) ? sprintf("%.2fx", rs / ps) : "-"
      fe = (re ~ num) ? sprintf("%.4e", re) : re; fp = (pe ~ num) ? sprintf("%.4e", pe) : pe
      fr = (rs ~ num) ? sprintf("%.3f", rs) : rs; fq = (ps ~ num) ? sprintf("%.3f", ps) : ps
      printf "| %s | %s | %s | %s | %s | %s | %s |\n", shape, fe, fp, ratio, fr, fq, speed
    }'
  done
} | if [ -n "$OUTPUT" ]; then tee "$OUTPUT"; else cat; fi
exit "$status"

#!/usr/bin/env bash
# Runs every libFuzzer harness of fuzz/ for SECONDS each and prints, per harness, the executions, exec/s, coverage
# (libFuzzer's cov: and ft:), the corpus size and the crashes found. Exits non-zero when any harness crashed.
#
#   scripts/fuzz.sh [SECONDS] [HARNESS...]     (default 600 s each; all harnesses)
#
# Environment:
#   FUZZ_JOBS=N        harnesses run at once (default 1: one after the other, one core each)
#   FUZZ_BUILD=DIR     the fuzz build (default build-fuzz; configured and built here when needed: clang, ASan+UBSan)
#   FUZZ_WORK=DIR      working corpora and findings (default $FUZZ_BUILD/fuzz-work); corpora grow across runs
#   FUZZ_TESTDATA=DIR  the shared test data (default ../shared/testdata) for run-time corpus material
#
# The working corpus of each harness is fuzz/seeds/<name> + fuzz/regressions/<name> + material from the test data
# (fuzz/corpus_from_testdata.py: real safetensors headers and configs, token files, and the shard of a quick RTN
# quantization of stories260K). Each harness runs in libFuzzer's fork mode, so that a finding does not end its run.
# Findings land in $FUZZ_WORK/findings/<name>/ (crash-*, oom-*, timeout-*, leak-*), each with <input>.txt, its
# report with the stack; replay one with `$FUZZ_BUILD/fuzz/fuzz_<name> FILE`, and once fixed, add the input to
# fuzz/regressions/<name>/ (CTest's fuzz_replay_<name> then runs it in every build).
set -euo pipefail

SECONDS_EACH=${1:-600}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${FUZZ_BUILD:-$ROOT/build-fuzz}
WORK=${FUZZ_WORK:-$BUILD/fuzz-work}
TESTDATA=${FUZZ_TESTDATA:-$ROOT/../shared/testdata}
JOBS=${FUZZ_JOBS:-1}
ALL=(safetensors safetensors_index model_config npy cli_config shard_edit shard_raw)
if [[ $# -gt 0 ]]; then HARNESSES=("$@"); else HARNESSES=("${ALL[@]}"); fi

export CCACHE_DIR=${CCACHE_DIR:-/work/.ccache} CCACHE_BASEDIR=${CCACHE_BASEDIR:-/work}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# leaks: MPI and HDF5 keep process-lifetime allocations that LeakSanitizer reports at exit; UBSan: stacks
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

build() {
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DPIPEQUANT_CUDA=OFF \
      -DPIPEQUANT_SANITIZE=address,undefined -DPIPEQUANT_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >/dev/null
  fi
  local targets=(pipequant)
  for h in "${HARNESSES[@]}"; do targets+=("fuzz_$h"); done
  cmake --build "$BUILD" -j"$(nproc)" --target "${targets[@]}" >"$WORK/build.log" 2>&1 ||
    { tail -40 "$WORK/build.log"; echo "fuzz.sh: build failed ($WORK/build.log)" >&2; exit 2; }
}

# A quantized output of stories260K (RTN, a few samples: seconds), for the shard_raw corpus.
quantized_output() {
  local out=$WORK/stories260K-rtn
  if [[ ! -f $out/model.h5 && -d $TESTDATA/stories260K ]]; then
    "$BUILD/pipequant" quantize --model "$TESTDATA/stories260K" \
      --calib "$TESTDATA/text/tinystories_calib.tok512.npy" --seq-len 32 --nsamples 4 --method rtn --bits 4 \
      --group-size 32 --backend cpu --out "$out" --overwrite >"$WORK/quantize.log" 2>&1 ||
      echo "fuzz.sh: quantizing stories260K failed ($WORK/quantize.log); shard_raw runs without its shard" >&2
  fi
  if [[ -f $out/model.h5 ]]; then echo "$out"; fi
}

assemble_corpora() {
  for h in "${HARNESSES[@]}"; do
    mkdir -p "$WORK/corpus/$h" "$WORK/findings/$h"
    # libFuzzer mutates up to the largest corpus file: a text harness takes files up to 64 KiB (the regressions of
    # deep nesting are larger; CTest's fuzz_replay_<name> replays those)
    local limit=()
    case $h in shard_*) ;; *) limit=(-size -65537c) ;; esac
    for dir in "$ROOT/fuzz/seeds/$h" "$ROOT/fuzz/regressions/$h"; do
      if [[ -d $dir ]]; then find "$dir" -type f "${limit[@]}" -exec cp {} "$WORK/corpus/$h/" \;; fi
    done
  done
  if [[ -d $TESTDATA ]]; then
    local out
    out=$(quantized_output)
    /usr/bin/python3 "$ROOT/fuzz/corpus_from_testdata.py" --testdata "$TESTDATA" --corpus "$WORK/corpus" \
      ${out:+--output "$out"}
  else
    echo "fuzz.sh: no test data at $TESTDATA; the corpora are the seeds and regressions only" >&2
  fi
}

# Runs one harness; its log is $WORK/logs/<name>.log.
run_one() {
  local h=$1 opts=()
  [[ -f $ROOT/fuzz/dicts/$h.dict ]] && opts+=(-dict="$ROOT/fuzz/dicts/$h.dict")
  local scratch
  scratch=$(mktemp -d /dev/shm/pipequant-fuzz-run.XXXXXX)
  # one core, in a child process that libFuzzer restarts after a crash (-fork=1 with -ignore_*: one finding does not
  # end the run, and libhdf5's leaks on damaged files do not accumulate); stdout (help texts) closed; a slow input is
  # a finding after 10 s; no size taken from a file may allocate more than 2 GB
  PIPEQUANT_FUZZ_SCRATCH=$scratch nice -n 10 "$BUILD/fuzz/fuzz_$h" "$WORK/corpus/$h" "${opts[@]}" \
    -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 -max_total_time="$SECONDS_EACH" \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -close_fd_mask=1 -artifact_prefix="$WORK/findings/$h/" \
    >"$WORK/logs/$h.log" 2>&1 || true
  rm -rf "$scratch"
  # fork mode logs one line per finding: each one's whole report (the stack) is made again, next to it
  local f
  for f in $(new_findings "$h"); do
    scratch=$(mktemp -d /dev/shm/pipequant-fuzz-run.XXXXXX)
    PIPEQUANT_FUZZ_SCRATCH=$scratch timeout 120 "$BUILD/fuzz/fuzz_$h" -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -timeout=10 "$f" >"$f.txt" 2>&1 || true
    rm -rf "$scratch"
  done
}

# The findings of harness $1 from this run (crash-*, oom-*, timeout-*, leak-*; not their .txt reports).
new_findings() {
  find "$WORK/findings/$1" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o \
    -name 'leak-*' \) ! -name '*.txt' -newer "$WORK/started"
}

# One line of the summary from a harness's log and findings. libFuzzer's fork mode ends its log with lines
#   #12345: cov: 2107 ft: 6012 corp: 812 exec/s 1502 oom/timeout/crash: 0/0/1 time: 600s job: 41 dft_time: 0
summarize() {
  local h=$1
  local log=$WORK/logs/$h.log
  local last execs seconds rate cov ft corp crashes
  last=$(grep -E '^#[0-9]+: cov: ' "$log" | tail -1)
  execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
  seconds=$(sed -E 's/.* time: ([0-9]+)s.*/\1/' <<<"$last")
  [[ -n $execs && ${seconds:-0} -gt 0 ]] && rate=$((execs / seconds))
  cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}')
  ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}')
  corp=$(grep -oE 'corp: [0-9]+' <<<"$last" | awk '{print $2}')
  crashes=$(new_findings "$h" | wc -l)
  printf '%-18s %12s %8s %7s %7s %12s %8s\n' "$h" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
    "$crashes"
  [[ $crashes -eq 0 ]]
}

mkdir -p "$WORK/logs"
build
assemble_corpora
touch "$WORK/started"
echo "fuzz.sh: ${#HARNESSES[@]} harnesses, ${SECONDS_EACH} s each, $JOBS at once; logs in $WORK/logs" >&2
running=0
for h in "${HARNESSES[@]}"; do
  run_one "$h" &
  running=$((running + 1))
  if [[ $running -ge $JOBS ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
# libomp leaves /dev/shm/__KMP_REGISTERED_LIB_<pid>_0 behind for every fuzzing process that crashed
for f in /dev/shm/__KMP_REGISTERED_LIB_*; do
  [[ -e $f && $f -nt $WORK/started ]] || continue
  pid=${f#/dev/shm/__KMP_REGISTERED_LIB_}
  kill -0 "${pid%%_*}" 2>/dev/null || rm -f "$f"
done

status=0
printf '%-18s %12s %8s %7s %7s %12s %8s\n' harness executions exec/s cov ft corpus crashes
for h in "${HARNESSES[@]}"; do summarize "$h" || status=1; done
if [[ $status -ne 0 ]]; then
  echo "fuzz.sh: findings in $WORK/findings/<harness>/ (each input with its report, stack included, in <input>.txt)" >&2
fi
exit $status

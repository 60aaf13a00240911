#!/usr/bin/env bash
# mpirun wrapper for pipequant (and anything else): starts N ranks with the flags a workstation, a container
# or a cluster allocation needs, and gives each rank its own environment.
#
#   launch/pq_mpirun.sh -np N PROGRAM [ARGS...]      (also: -n N, or a bare N as first argument)
#   srun launch/pq_mpirun.sh --rank PROGRAM [ARGS...]  (under srun: only the per-rank part)
#
# mpirun runs with --oversubscribe --bind-to none (and --allow-run-as-root when run as root).
# Every rank then goes through this script again (--rank) before exec'ing PROGRAM, which:
#   - with PIPEQUANT_BIND_GPU=1, sets CUDA_VISIBLE_DEVICES to one GPU chosen by the node-local rank
#     (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID or PMI_LOCAL_RANK). When
#     CUDA_VISIBLE_DEVICES is already set (Slurm --gpus-per-node does that) the choice is made within
#     that list. More ranks than GPUs on a node wrap around (pipequant then uses the mpi transport);
#   - sets OMP_NUM_THREADS to cores / ranks-on-this-node when it is not set, so ranks do not fight over cores.
# Environment: PQ_MPIRUN (the mpirun to use, default mpirun), PQ_MPIRUN_ARGS (extra mpirun flags, split on
# spaces), PIPEQUANT_BIND_GPU, PIPEQUANT_VERBOSE_BIND=1 (each rank prints its binding).
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

usage() {
  echo "usage: $(basename "$0") -np N PROGRAM [ARGS...] | $(basename "$0") --rank PROGRAM [ARGS...]" >&2
  exit 2
}

first_set() { # prints the first non-empty value among the named variables
  local v
  for v in "$@"; do
    if [ -n "${!v:-}" ]; then echo "${!v}"; return 0; fi
  done
  return 1
}

slurm_tasks_here() { # tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1") and SLURM_NODEID
  local list="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}" node="${SLURM_NODEID:-0}" item count reps idx=0
  [ -n "$list" ] || return 1
  IFS=',' read -r -a items <<<"$list"
  for item in "${items[@]}"; do
    count="${item%%(*}"
    reps=1
    if [[ "$item" =~ \(x([0-9]+)\) ]]; then reps="${BASH_REMATCH[1]}"; fi
    if [ "$node" -lt $((idx + reps)) ]; then echo "$count"; return 0; fi
    idx=$((idx + reps))
  done
  return 1
}

count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  elif [ -d /proc/driver/nvidia/gpus ]; then
    find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 | wc -l
  else
    echo 0
  fi
}

rank_exec() {
  [ $# -ge 1 ] || usage
  local local_rank local_size
  local_rank="$(first_set OMPI_COMM_WORLD_LOCAL_RANK SLURM_LOCALID MPI_LOCALRANKID PMI_LOCAL_RANK || echo 0)"
  local_size="$(first_set OMPI_COMM_WORLD_LOCAL_SIZE MPI_LOCALNRANKS PMI_LOCAL_SIZE || slurm_tasks_here || echo 1)"
  [ "$local_size" -ge 1 ] 2>/dev/null || local_size=1

  if [ "${PIPEQUANT_BIND_GPU:-0}" = "1" ]; then
    local devices=() n
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      IFS=',' read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
    else
      n="$(count_gpus)"
      for ((i = 0; i < n; i++)); do devices+=("$i"); done
    fi
    if [ "${#devices[@]}" -gt 0 ]; then
      export CUDA_VISIBLE_DEVICES="${devices[$((local_rank % ${#devices[@]}))]}"
    else
      [ "$local_rank" != 0 ] || echo "[$(hostname -s)] PIPEQUANT_BIND_GPU=1 but no GPU is visible; ranks run without one" >&2
    fi
  fi
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    local cores
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS=$((cores / local_size > 0 ? cores / local_size : 1))
  fi
  if [ "${PIPEQUANT_VERBOSE_BIND:-0}" = "1" ]; then
    echo "[$(hostname -s) local rank $local_rank/$local_size] CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset} OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
  fi
  exec "$@"
}

[ $# -ge 1 ] || usage
if [ "$1" = "--rank" ]; then
  shift
  rank_exec "$@"
fi

np=""
case "$1" in
  -np | -n | --np)
    [ $# -ge 2 ] || usage
    np="$2"; shift 2 ;;
  -np=* | --np=* | -n=*)
    np="${1#*=}"; shift ;;
  *)
    if [[ "$1" =~ ^[0-9]+$ ]]; then np="$1"; shift; fi ;;
esac
[[ "$np" =~ ^[1-9][0-9]*$ ]] || { echo "$(basename "$0"): give the number of ranks first: -np N" >&2; usage; }
[ $# -ge 1 ] || usage

MPIRUN="${PQ_MPIRUN:-mpirun}"
args=(--oversubscribe --bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  args=(--allow-run-as-root "${args[@]}")
  # Open MPI also reads these; they keep child launches (singletons, tests) working as root
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# ranks on other nodes only see variables passed with -x
for v in PIPEQUANT_BIND_GPU PIPEQUANT_VERBOSE_BIND OMP_NUM_THREADS OPENBLAS_NUM_THREADS PIPEQUANT_TESTDATA; do
  if [ -n "${!v:-}" ]; then args+=(-x "$v"); fi
done
extra=()
if [ -n "${PQ_MPIRUN_ARGS:-}" ]; then read -r -a extra <<<"$PQ_MPIRUN_ARGS"; fi

exec "$MPIRUN" "${args[@]}" "${extra[@]}" -np "$np" "$SELF" --rank "$@"

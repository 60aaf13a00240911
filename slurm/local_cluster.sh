#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing the sbatch templates and srun/mpirun launches.
#
#   slurm/local_cluster.sh [start]   install slurm-wlm + munge if missing, write the config, start munged,
#                                    slurmctld and slurmd, wait until `sinfo` shows the node idle
#   slurm/local_cluster.sh stop      stop the daemons this script started
#   slurm/local_cluster.sh status    sinfo and the daemons' pids
#
# Needs root. The node gets this host's short name, CPUs from nproc, RealMemory from /proc/meminfo less a
# margin (PQ_SLURM_MEM_MARGIN_MB, default 1024), and the NVIDIA GPUs found under /dev as gres "gpu".
# The config goes to /etc/slurm/slurm.conf (where srun/sbatch/sinfo look); an existing slurm.conf that this
# script did not write is left alone and the script stops. Daemons run as root with no cgroups and no
# accounting: this is a test cluster, not a production setup. Logs: /var/log/slurm-local/.
set -euo pipefail

ACTION="${1:-start}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by pipequant slurm/local_cluster.sh"
STATE=/var/lib/slurm-local
LOGS=/var/log/slurm-local
RUN=/run/slurm-local
MARGIN_MB="${PQ_SLURM_MEM_MARGIN_MB:-1024}"
WAIT_S="${PQ_SLURM_WAIT_S:-90}"

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: $*" >&2; exit 1; }
installed() { dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "run as root (the daemons and /etc/slurm need it)"

stop_pidfile() { # stop_pidfile NAME PIDFILE: TERM, wait, then KILL the one process named in PIDFILE
  local name="$1" pidfile="$2" pid
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
  say "stopped $name (pid $pid)"
}

do_stop() {
  stop_pidfile slurmd "$RUN/slurmd.pid"
  stop_pidfile slurmctld "$RUN/slurmctld.pid"
  # munged only if this script started it (another munged may serve a real cluster)
  if [ -f "$RUN/munged.started" ]; then
    stop_pidfile munged "$RUN/munged.pid"
    rm -f "$RUN/munged.started"
  fi
  say "stopped"
}

do_status() {
  local d
  for d in munged slurmctld slurmd; do
    if alive "$RUN/$d.pid"; then say "$d running (pid $(cat "$RUN/$d.pid"))"; else say "$d not running"; fi
  done
  sinfo 2>/dev/null || true
}

install_packages() {
  local missing=() p
  for p in slurm-wlm munge; do installed "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "slurm-wlm and munge present ($(slurmd -V))"
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    install -d -m 0700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
    return 0
  fi
  install -d -m 0755 -o munge -g munge /run/munge
  install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$RUN/munged.pid"
  touch "$RUN/munged.started"
  say "munged started (pid $(cat "$RUN/munged.pid"))"
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it"
  fi
  local host cpus mem_kb mem_mb ngpu gres_line="" gres_types=""
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  mem_mb=$((mem_kb / 1024 - MARGIN_MB))
  [ "$mem_mb" -gt 0 ] || mem_mb=$((mem_kb / 1024))
  ngpu="$(find /dev -maxdepth 1 -regex '/dev/nvidia[0-9]+' 2>/dev/null | wc -l)"
  install -d -m 0755 "$CONF_DIR"
  if [ "$ngpu" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_line="Gres=gpu:$ngpu"
    {
      echo "$MARKER"
      echo "NodeName=$host Name=gpu File=/dev/nvidia[0-$((ngpu - 1))]"
    } >"$CONF_DIR/gres.conf"
  else
    rm -f "$CONF_DIR/gres.conf"
  fi
  cat >"$CONF" <<CONF
$MARKER
# one node: $host, $cpus CPUs, ${mem_mb} MB, $ngpu GPU(s)
ClusterName=pipequant-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=60
$gres_types
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb $gres_line State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem_mb / cpus))
CONF
  say "wrote $CONF (node $host: CPUs=$cpus RealMemory=${mem_mb}MB GPUs=$ngpu)"
}

wait_idle() {
  local host state
  host="$(hostname -s)"
  for i in $(seq 1 "$WAIT_S"); do
    state="$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle | mixed | allocated) say "node $host is $state"; sinfo; return 0 ;;
      down* | drain* | drained*)
        # a restart can leave the node down from the last run; this is our test node, so resume it
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ $((i % 10)) -eq 0 ]; then say "waiting for $host (state: ${state:-unknown})"; fi
    sleep 1
  done
  sinfo || true
  die "node $host did not become idle within ${WAIT_S}s; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

do_start() {
  install_packages
  install -d -m 0755 "$RUN" "$LOGS" "$STATE/ctld" "$STATE/d"
  start_munge
  write_config
  if alive "$RUN/slurmctld.pid"; then
    say "slurmctld already running; reconfiguring"
    scontrol reconfigure || true
  else
    slurmctld -i
    say "slurmctld started"
  fi
  if alive "$RUN/slurmd.pid"; then
    say "slurmd already running"
  else
    slurmd
    say "slurmd started"
  fi
  wait_idle
  say "ready: try  srun -n 2 hostname ; stop with  $0 stop"
}

case "$ACTION" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  restart) do_stop; do_start ;;
  *) die "usage: $0 [start|stop|status|restart]" ;;
esac

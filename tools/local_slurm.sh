#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the sbatch templates and requeue for real.
#
#   bash tools/local_slurm.sh up       install slurm-wlm + munge if missing (apt-get, needs root),
#                                      start munged, slurmctld and slurmd; prints `export SLURM_CONF=...`
#   bash tools/local_slurm.sh down     stop the three daemons by their pids
#   bash tools/local_slurm.sh status   show whether they run and what sinfo says
#
# One CPU-only node named after this host, with $LORAFIT_SLURM_CPUS CPUs (default: nproc), in
# partition "debug". Everything lives in $LORAFIT_SLURM_DIR (default /tmp/lorafit-slurm): slurm.conf,
# state, spool, logs, pid files. Clients find the cluster through SLURM_CONF=$LORAFIT_SLURM_DIR/slurm.conf.
# Ports: $LORAFIT_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail
# The daemons and runuser live in sbin, which a non-login shell's PATH (CI, env -i) may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

dir=${LORAFIT_SLURM_DIR:-/tmp/lorafit-slurm}
conf=$dir/slurm.conf
munge_dir=$dir/munge
node=$(hostname -s)
cpus=${LORAFIT_SLURM_CPUS:-$(nproc)}
port=${LORAFIT_SLURM_PORT:-6817}

say() { echo "local_slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_missing() {
  local missing=()
  for tool in munged slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || die "${missing[*]} not installed and not root: install slurm-wlm and munge (apt-get) or run as root"
  command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get: install slurm-wlm and munge yourself"
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$dir"/{state,spool,log} "$munge_dir"
  cat >"$conf" <<EOF
# Written by tools/local_slurm.sh: a single CPU node on localhost for lorafit's tests.
ClusterName=lorafit-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups here (containers rarely allow them): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# The node's CPU count is what we say, whatever the hardware reports.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  pid_alive "$munge_dir/munged.pid" && return
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  fi
  # munged insists that its key and directories belong to the user it runs as.
  # Its socket directory must be searchable by everybody (clients connect) but writable only by it.
  chown -R munge:munge "$munge_dir" /etc/munge
  chmod 755 "$munge_dir"
  chmod 700 /etc/munge
  chmod 400 "$key"
  runuser -u munge -- munged --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" --key-file="$key"
}

wait_for_node() {
  for _ in $(seq 60); do
    state=$(SLURM_CONF=$conf sinfo -h -n "$node" -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) return 0 ;; esac
    sleep 1
  done
  die "node $node did not become idle (state '${state:-?}'); see $dir/log/"
}

up() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd starts job processes as their user)"
  install_if_missing
  write_conf
  start_munge
  pid_alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
  pid_alive "$dir/slurmd.pid" || slurmd -f "$conf"
  wait_for_node
  # A node left DOWN/DRAIN by an earlier unclean stop is resumed by ReturnToService=2.
  say "cluster up: node $node with $cpus CPUs, partition debug"
  echo "export SLURM_CONF=$conf"
}

stop_pid() {
  local name=$1 file=$2
  pid_alive "$file" || return 0
  local pid
  pid=$(cat "$file")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }; sleep 0.2; done
  say "$name ($pid) ignored SIGTERM; killing it"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

down() {
  stop_pid slurmd "$dir/slurmd.pid"
  stop_pid slurmctld "$dir/slurmctld.pid"
  stop_pid munged "$munge_dir/munged.pid"
  say "cluster down"
}

status() {
  for pair in "slurmctld:$dir/slurmctld.pid" "slurmd:$dir/slurmd.pid" "munged:$munge_dir/munged.pid"; do
    name=${pair%%:*}; file=${pair#*:}
    if pid_alive "$file"; then echo "$name running (pid $(cat "$file"))"; else echo "$name stopped"; fi
  done
  [ -f "$conf" ] && SLURM_CONF=$conf sinfo 2>/dev/null || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

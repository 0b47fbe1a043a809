#!/usr/bin/env bash
# A private single-node SLURM cluster from Debian's slurm-wlm + munge, for ftlab's SLURM tests and for trying
# `hw=slurm_cpu` on one machine. It coexists with any other cluster there: free ports picked at start-up, its own
# state, spool, log and run directories, its own munge key and socket; clients find it through SLURM_CONF only.
#
#   scripts/slurm_cluster.sh install        apt-get install slurm-wlm munge, pip install hydra-submitit-launcher
#                                           (each only if missing; needs root for apt)
#   eval "$(scripts/slurm_cluster.sh up [DIR])"     start munged, slurmctld, slurmd; print the client env
#   scripts/slurm_cluster.sh env [DIR]      print the client env again (export SLURM_CONF=...; PATH=...)
#   scripts/slurm_cluster.sh status [DIR]   sinfo + squeue of this cluster
#   scripts/slurm_cluster.sh down [DIR]     cancel its jobs, stop its daemons (by their pid files), delete DIR
#
# DIR defaults to $FTLAB_SLURM_DIR or /tmp/ftlab-slurm-<uid>. Only stdout carries the env lines; everything else
# goes to stderr. Recipe and measurements: ../shared/research/stack-notes.md sections 5.11-5.13.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${FTLAB_SLURM_DIR:-/tmp/ftlab-slurm-$(id -u)}}
MARK=.ftlab-slurm   # written at `up`; `down` deletes only a directory that carries it

say() { echo "slurm_cluster: $*" >&2; }
die() { say "$*"; exit 1; }

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd -P); }

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

print_env() {
  echo "export SLURM_CONF=$DIR/etc/slurm.conf"
  # bin/ holds the sacct stand-in (without slurmdbd, submitit cannot tell a cancelled job from a running one)
  echo "export PATH=$DIR/bin:\$PATH"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: run '$0 install' (Debian: apt-get install slurm-wlm munge)"; }

do_install() {
  local missing=()
  for b in slurmctld slurmd sbatch munged mungekey; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing slurm-wlm munge (missing: ${missing[*]})"
    command -v apt-get >/dev/null || die "apt-get not found; install SLURM (slurmctld, slurmd, slurm-client) and munge by hand"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null || die "apt-get needs root (no sudo here)"
      sudo=(sudo)
    fi
    # without recommends: 8 packages, 3.5 MB (with them, 43, none needed here)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
    for b in slurmctld slurmd sbatch munged mungekey; do need "$b"; done
  else
    say "slurm and munge already installed ($(slurmctld -V))"
  fi
  # the launcher is an ftlab dependency; this only mends a virtualenv that lacks it (never a system python)
  if ! python3 -c 'import hydra_plugins.hydra_submitit_launcher' 2>/dev/null; then
    if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
      say "installing hydra-submitit-launcher into $(python3 -c 'import sys; print(sys.prefix)')"
      python3 -m pip install -q hydra-submitit-launcher >&2
    else
      say "no virtualenv active: not installing hydra-submitit-launcher (pip install -e . in ftlab's venv brings it)"
    fi
  fi
}

write_conf() {   # $1 node, $2 cpus, $3 mem MB, $4 ctld port, $5 slurmd port
  cat <<EOF
# written by ftlab scripts/slurm_cluster.sh; absolute paths only (slurmctld chdirs after daemonizing)
ClusterName=ftlab
MailProg=/bin/true
SlurmctldHost=$1(127.0.0.1)
SlurmctldPort=$4
SlurmdPort=$5
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd: works in containers and CI
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=10
# finished jobs stay visible to scontrol (the sacct stand-in answers from it)
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
# A job in 'high' preempts (requeues) jobs in 'debug', which first get their --signal (like a real cluster's
# preemption with preempt_send_user_signal)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$1 NodeAddr=127.0.0.1 CPUs=$2 RealMemory=$3 State=UNKNOWN
PartitionName=debug Nodes=$1 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes=$1 MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF
}

write_sacct() {   # answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID...` from scontrol
  local real
  real=$(command -v sacct || echo /usr/bin/sacct)
  cat <<EOF
#!/bin/bash
# sacct stand-in for this cluster (no slurmdbd): the real one first, else scontrol's view of the jobs.
"$real" "\$@" 2>/dev/null && exit 0
ids=()
while [ \$# -gt 0 ]; do case "\$1" in -j|--jobs) ids+=(\${2//,/ }); shift 2 ;; *) shift ;; esac; done
echo "JobID|State|NodeList"
for id in "\${ids[@]}"; do
  scontrol show job -o "\$id" 2>/dev/null | awk '{
    for (i = 1; i <= NF; i++) { k = substr(\$i, 1, index(\$i, "=") - 1); v[k] = substr(\$i, index(\$i, "=") + 1) }
    jid = v["JobId"]
    if (v["ArrayJobId"] != "") { t = v["ArrayTaskId"]; if (t ~ /[-,]/) t = "[" t "]"; jid = v["ArrayJobId"] "_" t }
    print jid "|" v["JobState"] "|" v["NodeList"]; delete v }'
done
EOF
}

do_up() {
  for b in munged mungekey slurmctld slurmd sinfo; do need "$b"; done
  DIR=$(abs_dir "$DIR")
  if alive "$DIR/run/slurmctld.pid"; then
    say "already up in $DIR"
    print_env
    return 0
  fi
  local node cpus mem ctld_port slurmd_port
  node=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) / 2 ))
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
  mkdir -p "$DIR"/{etc,run,log,state,bin,spool/slurmd-"$node"}
  touch "$DIR/$MARK"
  chmod 700 "$DIR/etc"
  if [ ! -f "$DIR/etc/munge.key" ]; then
    mungekey --create --keyfile="$DIR/etc/munge.key" >&2
    chmod 400 "$DIR/etc/munge.key"
  fi
  # --force: munged refuses to run as root otherwise
  munged --force --socket="$DIR/run/munge.socket" --key-file="$DIR/etc/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munged.seed" >&2
  write_conf "$node" "$cpus" "$mem" "$ctld_port" "$slurmd_port" > "$DIR/etc/slurm.conf"
  write_sacct > "$DIR/bin/sacct"
  chmod +x "$DIR/bin/sacct"
  export SLURM_CONF="$DIR/etc/slurm.conf"
  slurmctld -f "$SLURM_CONF" >&2
  slurmd -f "$SLURM_CONF" -N "$node" >&2
  for _ in $(seq 120); do
    if sinfo -h -o %T 2>/dev/null | grep -q '^idle'; then
      say "up: $DIR (slurmctld port $ctld_port, slurmd port $slurmd_port, node $node, $cpus CPUs)"
      print_env
      return 0
    fi
    sleep 0.25
  done
  say "did not come up within 30 s; logs:"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  exit 1
}

do_down() {
  [ -d "$DIR" ] || { say "nothing at $DIR"; return 0; }
  DIR=$(cd "$DIR" && pwd -P)
  [ -f "$DIR/$MARK" ] || die "$DIR was not made by this script (no $MARK); not touching it"
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if alive "$DIR/run/slurmctld.pid"; then
    # jobs first: slurmstepd outlives a stopped slurmd
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 40); do
      [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local f pid
  for f in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid "$DIR"/run/munged.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$DIR"
  say "down: $DIR removed"
}

do_status() {
  [ -f "$DIR/etc/slurm.conf" ] || die "no cluster at $DIR"
  export SLURM_CONF="$DIR/etc/slurm.conf"
  sinfo
  squeue
}

case "$cmd" in
  install) do_install ;;
  up) do_up ;;
  down) do_down ;;
  env) [ -f "$DIR/etc/slurm.conf" ] || die "no cluster at $DIR"; DIR=$(cd "$DIR" && pwd -P); print_env ;;
  status) do_status ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

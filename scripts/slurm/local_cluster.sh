#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd started
# by hand (no systemd), with their own config, logs and state under one directory.
#
#   scripts/slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, start, wait idle
#   scripts/slurm/local_cluster.sh status   # daemons, sinfo, squeue
#   scripts/slurm/local_cluster.sh env      # prints `export SLURM_CONF=...`; eval it to use the cluster
#   scripts/slurm/local_cluster.sh stop     # cancel jobs, stop the daemons this script started
#
# Needs root (or sudo): the daemons run as root, munged as the munge user. Works unattended
# (CI=true, no stdin). Settings, all optional:
#   MPIML_SLURM_DIR       state directory            [/tmp/mpiml-slurm]
#   MPIML_SLURM_PORT      slurmctld port; slurmd uses the next one   [6817]
#   MPIML_SLURM_TIMEOUT   seconds to wait for the node to become idle [60]
#   MPIML_SLURM_CRED_EXPIRE  job credential lifetime; also how long a requeued job waits
#                         before it may start again (Slurm's default is 120 s)  [10]
# The client commands (sinfo, sbatch, srun, scontrol) find this cluster through SLURM_CONF.
set -euo pipefail

STATE=${MPIML_SLURM_DIR:-/tmp/mpiml-slurm}
PORT=${MPIML_SLURM_PORT:-6817}
TIMEOUT=${MPIML_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${MPIML_SLURM_CRED_EXPIRE:-10}
CONF=$STATE/etc/slurm.conf
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=
AS_MUNGE="runuser -u munge --"
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "run as root (or install sudo)"
    SUDO="sudo -n"
    AS_MUNGE="sudo -n -u munge"
fi

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} with apt-get (about 15 s)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq </dev/null
    $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge </dev/null >/dev/null
}

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # Slurm drains a node that reports less memory than configured: stay a little below.
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
    mkdir -p "$STATE"/{etc,log,spool/ctld,spool/d,run}
    cat >"$CONF" <<CONF
# Written by scripts/slurm/local_cluster.sh: one node, no cgroups, no accounting daemon.
ClusterName=mpiml-local
SlurmctldHost=$NODE
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every few seconds, so a requeued job restarts soon after it may.
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MailProg=/bin/true
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    : >"$STATE/etc/plugstack.conf"
}

start_munge() {
    if pid_alive "$MUNGE_DIR/munged.pid"; then return 0; fi
    [[ -s /etc/munge/munge.key ]] || {
        log "creating /etc/munge/munge.key"
        $SUDO mungekey --create --keyfile=/etc/munge/munge.key
        $SUDO chown munge:munge /etc/munge/munge.key
        $SUDO chmod 0400 /etc/munge/munge.key
    }
    $SUDO install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    $AS_MUNGE munged --socket="$MUNGE_SOCKET" --key-file=/etc/munge/munge.key \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged did not start; see $MUNGE_DIR/munged.log"
    munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || die "munge round trip failed; see $MUNGE_DIR/munged.log"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1; }

cmd_start() {
    local t0=$SECONDS
    install_packages
    if pid_alive "$STATE/run/slurmctld.pid" && pid_alive "$STATE/run/slurmd.pid"; then
        log "already running ($(node_state)); $0 stop to restart"
        return 0
    fi
    write_config
    start_munge
    pid_alive "$STATE/run/slurmctld.pid" || $SUDO slurmctld -c -f "$CONF" \
        || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    pid_alive "$STATE/run/slurmd.pid" || $SUDO slurmd -f "$CONF" -N "$NODE" \
        || die "slurmd did not start; see $STATE/log/slurmd.log"
    local state=
    while (( SECONDS - t0 < TIMEOUT )); do
        state=$(node_state)
        [[ $state == idle ]] && break
        sleep 1
    done
    if [[ $state != idle ]]; then
        log "node $NODE is '${state:-unreachable}' after ${TIMEOUT}s, not idle"
        tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        die "cluster did not come up (logs in $STATE/log; stop it with: $0 stop)"
    fi
    log "up in $((SECONDS - t0)) s: node $NODE idle, $(nproc) CPUs"
    log "use it with: export SLURM_CONF=$CONF   stop it with: $0 stop"
}

stop_pidfile() {  # stop_pidfile NAME FILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 file=$2 pid
    pid_alive "$file" || return 0
    pid=$(cat "$file")
    $SUDO kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) ignored SIGTERM: killing it"
        $SUDO kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cmd_stop() {
    if pid_alive "$STATE/run/slurmctld.pid"; then
        # Jobs first, so no slurmstepd or rank outlives the daemons.
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z $(squeue -h -t R,CG -o '%i' 2>/dev/null) ]] && break
                sleep 1
            done
        fi
    fi
    stop_pidfile slurmd "$STATE/run/slurmd.pid"
    stop_pidfile slurmctld "$STATE/run/slurmctld.pid"
    stop_pidfile munged "$MUNGE_DIR/munged.pid"
    log "stopped (logs kept in $STATE/log)"
}

cmd_status() {
    local rc=0 name file
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$MUNGE_DIR/munged.pid ;;
            *) file=$STATE/run/$name.pid ;;
        esac
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"
        else echo "$name: not running"; rc=1; fi
    done
    if [[ $rc -eq 0 ]]; then
        echo "SLURM_CONF=$CONF"
        sinfo -N -l || rc=1
        squeue || rc=1
    fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac

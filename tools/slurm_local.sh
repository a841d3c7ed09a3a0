#!/usr/bin/env bash
# A real single-node Slurm on this machine, for run_with_submitit.py, run.sh and the Slurm tests.
#
#     sudo tools/slurm_local.sh start     # munged + slurmctld + slurmd, waits until the node is idle
#     tools/slurm_local.sh status
#     sudo tools/slurm_local.sh stop      # cancels this cluster's jobs, stops the daemons it started
#
# Needs root and the Debian packages `slurmctld slurmd slurm-client munge` (`make setup` installs
# them as root: tools/setup_system.sh). Writes /etc/slurm/slurm.conf (refuses to overwrite one it did not write), keeps state
# under /var/spool/vlp-slurm and records the PIDs of the daemons it started in $PIDFILE; `stop`
# ends those PIDs only. `start` is idempotent. No systemd, no cgroups, no accounting (sacct
# fails; submitit then reports job state UNKNOWN, results still come back).
# Local-cluster settings that make requeues quick: KillWait=5 s, a requeued job may start again
# after cred_expire=10 s (Slurm's default is 120 s), pending jobs are looked at every 2 s.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK='# written by vlp-baselines tools/slurm_local.sh'
SPOOL=/var/spool/vlp-slurm
PIDFILE=${VLP_SLURM_PIDFILE:-/run/vlp-slurm-local.pids}
HOST=$(hostname -s)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
log() { echo "slurm_local.sh: $*"; }

need_root_and_binaries() {
    [ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"
    local b
    for b in munged slurmctld slurmd sinfo scontrol squeue scancel; do
        command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] ||
            die "$b not found; install: apt-get install -y slurmctld slurmd slurm-client munge"
    done
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not overwriting it"
    fi
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10240 ))
    mkdir -p /etc/slurm "$SPOOL/ctld" "$SPOOL/d" /var/log/slurm
    cat > "$CONF" <<EOF
$MARK: single node, root, no cgroups, no accounting
ClusterName=vlplocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SchedulerParameters=sched_interval=2
MailProg=/bin/true
MinJobAge=600
SlurmctldPidFile=$SPOOL/slurmctld.pid
SlurmdPidFile=$SPOOL/slurmd.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
DefMemPerCPU=$(( mem_mb / cpus ))
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive PID COMM: the process exists and is still the program we started
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

recorded() {  # recorded NAME -> the PID recorded for NAME (empty if none)
    if [ -f "$PIDFILE" ]; then awk -v n="$1" '$1 == n {print $2}' "$PIDFILE"; fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2
    shift 2
    for _ in $(seq "$((t * 2))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "timed out after ${t}s waiting for $what"
}

node_idle() { sinfo -h -n "$HOST" -o %T | grep -qx 'idle'; }

all_ours_alive() {
    local n
    [ -f "$PIDFILE" ] || return 1
    for n in munged slurmctld slurmd; do
        if [ "$(recorded "$n")" != "-" ]; then   # '-': in use but started by someone else
            alive "$(recorded "$n")" "$n" || return 1
        fi
    done
}

start() {
    need_root_and_binaries
    if all_ours_alive && node_idle_or_busy; then
        log "already running (PIDs in $PIDFILE); node $HOST: $(sinfo -h -n "$HOST" -o %T)"
        return 0
    fi
    if [ -f "$PIDFILE" ]; then
        log "found a partial cluster from an earlier start; stopping it first"
        stop
    fi
    if scontrol ping 2>/dev/null | grep -q 'UP'; then
        die "a Slurm controller not started by this script is already up; not touching it"
    fi
    write_conf
    local munge_pid=- ctld_pid slurmd_pid
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running (not started here; it will be left alone)"
    else
        [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
        mkdir -p /run/munge /var/lib/munge /var/log/munge
        chown munge:munge /run/munge /var/lib/munge /var/log/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 "munged" bash -c 'munge -n | unmunge'
        munge_pid=$(cat /run/munge/munged.pid)
    fi
    echo "munged $munge_pid" > "$PIDFILE"
    rm -f "$SPOOL/slurmctld.pid" "$SPOOL/slurmd.pid"
    /usr/sbin/slurmctld -c       # -c: start with an empty queue (a throwaway local cluster)
    wait_for 20 "slurmctld's PID file" test -s "$SPOOL/slurmctld.pid"
    ctld_pid=$(cat "$SPOOL/slurmctld.pid")
    echo "slurmctld $ctld_pid" >> "$PIDFILE"
    /usr/sbin/slurmd
    wait_for 20 "slurmd's PID file" test -s "$SPOOL/slurmd.pid"
    slurmd_pid=$(cat "$SPOOL/slurmd.pid")
    echo "slurmd $slurmd_pid" >> "$PIDFILE"
    wait_for 60 "node $HOST to be idle (see /var/log/slurm/)" node_idle
    log "up: node $HOST idle, $(nproc) CPUs; PIDs munged=$munge_pid slurmctld=$ctld_pid slurmd=$slurmd_pid in $PIDFILE"
}

stop() {
    [ "$(id -u)" = 0 ] || die "must run as root"
    if [ ! -f "$PIDFILE" ]; then
        log "not running (no $PIDFILE)"
        return 0
    fi
    if alive "$(recorded slurmctld)" slurmctld; then   # jobs' processes outlive slurmd: cancel them
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086  # one word per job id
            scancel $jobs || true
            for _ in $(seq 60); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    local n pid
    for n in slurmd slurmctld munged; do
        pid=$(recorded "$n")
        if alive "$pid" "$n"; then
            kill -TERM "$pid"
            for _ in $(seq 40); do alive "$pid" "$n" || break; sleep 0.25; done
            if alive "$pid" "$n"; then kill -KILL "$pid"; fi
            log "stopped $n ($pid)"
        fi
    done
    rm -f "$PIDFILE"
}

status() {
    if all_ours_alive && node_idle_or_busy; then
        log "running: $(tr '\n' ' ' < "$PIDFILE")"
        sinfo
        return 0
    fi
    log "not running"
    return 3
}

node_idle_or_busy() { sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

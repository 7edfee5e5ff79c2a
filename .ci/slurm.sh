#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the integration tests (root only):
#   .ci/slurm.sh start   install (Debian packages) and start munged, MariaDB, slurmdbd,
#                        slurmctld and slurmd on localhost; idempotent
#   .ci/slurm.sh stop    stop exactly the daemons `start` started (by their PIDs)
# Job accounting (slurmdbd with a local MariaDB) makes `sacct` work, which submitit polls for
# job states; without it submitit backs off for minutes.
set -euo pipefail

STATE=/run/capkv-slurm          # PIDs of the daemons this script started, one file each
CLUSTER=capkv
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
HOST=$(hostname -s)

say() { echo "slurm.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "needs root (it installs packages and starts system daemons)"
    exit 1
fi

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Every wait and every call to a daemon is bounded: a daemon that dies or hangs fails the run
# with its log's last lines, never hangs CI.
LOG_LINES=20

# log_of NAME: the log file of a daemon this script starts.
log_of() {
    case "$1" in
        munged) echo /var/log/munge/munged.log ;;
        mariadb) echo /var/log/slurm/mariadb.log ;;
        *) echo "/var/log/slurm/$1.log" ;;
    esac
}

# fail "NAMES" MESSAGE: say what went wrong, show the end of the log of each daemon in NAMES
# (space-separated), exit 1.
fail() {
    local names=$1 name log
    say "$2"
    for name in $names; do
        log=$(log_of "$name")
        if [ -s "$log" ]; then
            say "last $LOG_LINES lines of $log:"
            tail -n "$LOG_LINES" "$log" >&2
        else
            say "($log is empty or missing)"
        fi
    done
    exit 1
}

# wait_for SECONDS "NAMES" DESCRIPTION COMMAND...: poll until COMMAND succeeds (each try bounded
# to 10 s), or fail with the logs of NAMES.
wait_for() {
    local seconds=$1 name=$2 what=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if timeout 10 "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    fail "$name" "$what did not come up within ${seconds}s"
}

# bounded SECONDS NAME COMMAND...: run COMMAND, failing with NAME's log if it fails or outlasts
# SECONDS.
bounded() {
    local seconds=$1 name=$2
    shift 2
    local status=0
    timeout "$seconds" "$@" || status=$?
    if [ "$status" = 124 ]; then fail "$name" "$* did not finish within ${seconds}s"; fi
    if [ "$status" != 0 ]; then fail "$name" "$* failed (exit status $status)"; fi
}

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update -qq || { say "apt-get update failed or took over 600s"; exit 1; }
        timeout 1200 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || { say "apt-get install ${missing[*]} failed or took over 1200s"; exit 1; }
    fi
}

# started NAME PIDFILE: record the daemon's PID as started by this script.
started() {
    local name=$1 pidfile=$2
    wait_for 20 "$name" "$name's pid file" test -s "$pidfile"
    cat "$pidfile" >"$STATE/$name.pid"
}

# running NAME PIDFILE: whether a daemon of that name is already running (ours or not).
running() {
    local pidfile=$2
    [ -s "$pidfile" ] && alive "$(cat "$pidfile")"
}

write_configs() {
    local cpus memory
    cpus=$(nproc)
    memory=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10))
    mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm
    chown slurm:slurm /var/spool/slurmctld /var/log/slurm
    cat >/etc/slurm/slurm.conf <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
MinJobAge=30
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
}

start() {
    install_packages
    mkdir -p "$STATE"
    write_configs

    if ! running munged /run/munge/munged.pid; then
        mkdir -p /run/munge
        chown munge:munge /run/munge
        bounded 30 munged runuser -u munge -- /usr/sbin/munged
        started munged /run/munge/munged.pid
    fi
    wait_for 20 munged munged sh -c 'munge -n | unmunge'

    if ! running mariadb /run/mysqld/mysqld.pid; then
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
            --socket=/run/mysqld/mysqld.sock --skip-networking=0 --bind-address=127.0.0.1 \
            >/var/log/slurm/mariadb.log 2>&1 </dev/null &
        started mariadb /run/mysqld/mysqld.pid
    fi
    wait_for 60 mariadb MariaDB mariadb -e "SELECT 1"
    bounded 60 mariadb mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

    if ! running slurmdbd /run/slurmdbd.pid; then
        bounded 60 slurmdbd slurmdbd
        started slurmdbd /run/slurmdbd.pid
    fi
    wait_for 60 slurmdbd slurmdbd sacctmgr -n list cluster
    timeout 30 sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" \
        || bounded 60 slurmdbd sacctmgr -i add cluster "$CLUSTER" >/dev/null

    if ! running slurmctld /run/slurmctld.pid; then
        # -c: no jobs or node states from an earlier cluster on this machine (a node saved as
        # down or drained would never take the tests' jobs).
        bounded 60 slurmctld slurmctld -c
        started slurmctld /run/slurmctld.pid
    fi
    if ! running slurmd /run/slurmd.pid; then
        bounded 60 slurmd slurmd
        started slurmd /run/slurmd.pid
    fi
    wait_for 60 "slurmctld slurmd" "the node $HOST" \
        sh -c "sinfo -h -n $HOST -o %T | grep -Eq '^(idle|mixed|allocated)'"
    wait_for 30 "slurmdbd slurmctld" sacct sacct -n -X
    say "SLURM is up on $HOST ($(timeout 10 sinfo -h -o '%P %D %c CPUs %T'))"
}

stop() {
    [ -d "$STATE" ] || return 0
    # Reverse order of start; only the daemons this script started.
    for name in slurmd slurmctld slurmdbd mariadb munged; do
        local file="$STATE/$name.pid"
        [ -f "$file" ] || continue
        local pid
        pid=$(cat "$file")
        if alive "$pid"; then
            kill "$pid"
            for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
            alive "$pid" && kill -9 "$pid"
        fi
        rm -f "$file"
    done
    say "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) say "usage: $0 start|stop"; exit 2 ;;
esac

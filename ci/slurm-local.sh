#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (127.0.0.1), for trying profiles/slurm and for CI.
#
#   ci/slurm-local.sh start    install the Debian packages when missing, configure, start the daemons
#   ci/slurm-local.sh status   exit 0 when the cluster answers (scontrol, sacct), 1 otherwise
#   ci/slurm-local.sh stop     stop the daemons this script started
#
# Runs as root on Debian without systemd: munged, mariadbd, slurmdbd, slurmctld and slurmd are
# started by hand. The node has this machine's CPUs and (most of) its memory; accounting goes
# through slurmdbd on MariaDB (sacct works, accounts are enforced). Partitions: `main` (default)
# and `gpu` (the same node, no GPU: it only lets the profile's routing be seen). An account
# `vlmrel` is created for the current user. Start is idempotent: on a live cluster it does nothing.
# Config: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (written by this script).
set -euo pipefail

CLUSTER=vlmrel
ACCOUNT=vlmrel
USER_NAME=$(id -un)
NODE=$(hostname -s)
CONF_DIR=/etc/slurm
RUN_DIR=/run/vlmrel-slurm
LOG_DIR=/var/log/vlmrel-slurm
DB_PASS=vlmrel-slurmdbd

log() { echo "slurm-local: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (installs packages and starts daemons)"
        exit 2
    fi
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
    fi
}

cluster_up() {
    timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" &&
        timeout 10 sinfo -h -N -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated)" &&
        timeout 10 sacctmgr -n -P show assoc where user="$USER_NAME" account="$ACCOUNT" 2>/dev/null | grep -q .
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local n=$1 what=$2
    shift 2
    for _ in $(seq "$n"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    log "timed out waiting for $what"
    return 1
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # leave the OS and snakemake's own process some memory
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$RUN_DIR" "$LOG_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# written by ci/slurm-local.sh: one node on 127.0.0.1
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
# keep sbatch --comment (the executor plugin puts the rule name there) for sacct
AccountingStoreFlags=job_comment
# start jobs as soon as they are submitted, keep finished ones visible to squeue for 5 min
SchedulerParameters=sched_min_interval=0
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# written by ci/slurm-local.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
    # the Debian package ships a cgroup plugin config; task/none and proctrack/linuxproc need none
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
    if mysqladmin ping >/dev/null 2>&1; then return; fi
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid nohup mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mariadbd.pid \
        >"$LOG_DIR/mariadbd.log" 2>&1 </dev/null &
    wait_for 60 mariadbd mysqladmin ping
}

start_slurmdbd() {
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    pid_alive "$RUN_DIR/slurmdbd.pid" || slurmdbd
    wait_for 60 slurmdbd sacctmgr -n show cluster
}

add_accounts() {
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" ||
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" ||
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="vlmrel CI" Organization=vlmrel >/dev/null
    sacctmgr -n -P show assoc where user="$USER_NAME" account="$ACCOUNT" format=user | grep -q . ||
        sacctmgr -i add user "$USER_NAME" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
}

start_slurm() {
    pid_alive "$RUN_DIR/slurmctld.pid" || slurmctld
    wait_for 60 slurmctld sh -c 'scontrol ping | grep -q "is UP"'
    pid_alive "$RUN_DIR/slurmd.pid" || slurmd -N "$NODE"
    # a node left DOWN/DRAIN by an earlier run comes back
    wait_for 60 "node $NODE to register" sh -c "sinfo -h -N -n $NODE -o %T | grep -Evq '^(unknown|down)'" ||
        scontrol update NodeName="$NODE" State=RESUME
    wait_for 60 "node $NODE idle" sh -c "sinfo -h -N -n $NODE -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

start() {
    need_root
    if command -v scontrol >/dev/null && cluster_up; then
        log "cluster $CLUSTER is already up (no-op)"
        return 0
    fi
    install_packages
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    pid_alive "$RUN_DIR/slurmctld.pid" || write_config
    start_munge
    start_mariadb
    start_slurmdbd
    add_accounts
    start_slurm
    log "cluster $CLUSTER up: node $NODE ($(nproc) CPUs), partitions main (default) and gpu, account $ACCOUNT for $USER_NAME"
}

stop_pid() {  # stop_pid NAME PIDFILE
    if pid_alive "$2"; then
        local pid
        pid=$(cat "$2")
        kill "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        log "stopped $1"
    fi
}

stop() {
    need_root
    stop_pid slurmd "$RUN_DIR/slurmd.pid"
    stop_pid slurmctld "$RUN_DIR/slurmctld.pid"
    stop_pid slurmdbd "$RUN_DIR/slurmdbd.pid"
    stop_pid mariadbd /run/mysqld/mariadbd.pid
    if [ -f /run/munge/munged.pid ]; then stop_pid munged /run/munge/munged.pid; fi
}

status() {
    if command -v scontrol >/dev/null && cluster_up; then
        sinfo
        echo "accounts: $(sacctmgr -n -P show assoc where user="$USER_NAME" format=account | sort -u | tr '\n' ' ')"
        return 0
    fi
    echo "cluster $CLUSTER is not up"
    return 1
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac

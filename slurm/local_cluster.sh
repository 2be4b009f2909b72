#!/usr/bin/env bash
# A private single-node Slurm cluster on localhost, for the dispatch tests and for trying
# `make sweep LAUNCHER=slurm` on a laptop. Debian packages, no systemd, no root services touched:
# munged on its own socket and key, MariaDB on a private port and data dir, slurmdbd (so sacct
# and submitit see job states), slurmctld and slurmd. Everything lives in $SLURM_LOCAL_DIR, by
# default a new private folder (mktemp -d: no fixed name in /tmp that another user could
# pre-create), a folder of yours that is not a link; it is stopped by PID, never by name. The
# commands after `up` find it through SLURM_LOCAL_DIR, or the SLURM_CONF that `up` exports.
#
#   bash slurm/local_cluster.sh install   # apt-get the packages when missing
#   eval "$(bash slurm/local_cluster.sh up)"   # start; prints `export SLURM_CONF=... SLURM_LOCAL_DIR=...`
#   eval "$(bash slurm/local_cluster.sh up --nodes 2)"   # two nodes, node1 and node2 (root: namespaces)
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh running       # exit status 0 when it is up (scripts: reuse it, leave it up)
#   bash slurm/local_cluster.sh down
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-}
conf=${SLURM_CONF:-}
if [ -z "$DIR" ] && [ "$conf" != "${conf%/etc/slurm.conf}" ] && [ -f "${conf%/etc/slurm.conf}/.adam-local-cluster" ]; then
  DIR=${conf%/etc/slurm.conf}  # the cluster that `up` started for this shell
fi
CLUSTER=adamtest
DAEMONS=(slurmd slurmd-node1 slurmd-node2 slurmd-node3 slurmd-node4 slurmctld slurmdbd mariadbd munged)
NODES=1
# --nodes N (2 to 4): N slurmd, each in its own network and UTS namespace (host name nodeK, address
# $NET.K+1 on a veth pair to a private bridge, the cluster's /etc/hosts bind-mounted in its own
# mount namespace), sharing this machine's file system as a cluster shares its parallel one; the
# controller is this host, on the bridge's address. Root only (ip netns, a bridge).

log() { echo "[local_cluster] $*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for <seconds> <description> <command...>
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

cmd_install() {
  local need=()
  for b in slurmctld slurmd sbatch slurmdbd munged mariadbd; do command -v "$b" >/dev/null || need+=("$b"); done
  if [ ${#need[@]} -eq 0 ]; then log "packages present"; return; fi
  log "installing slurm, munge and mariadb (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client slurmdbd munge \
    mariadb-server mariadb-client >/dev/null
}

write_confs() {
  local cpus mem
  # the CPUs this machine gives us; not nproc's answer under OMP_NUM_THREADS (it returns that
  # variable's value: a test suite run with one thread per process would get a 1-CPU node)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  local host=localhost spool=$DIR/spool pidf=$DIR/run/slurmd.pid logf=$DIR/log/slurmd.log nodes k
  nodes="NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
  if [ "$NODES" -gt 1 ]; then  # each node its share of the CPUs and memory, at least one CPU
    host="$(hostname -s)($NET.1)" spool="$DIR/spool/%n" pidf="$DIR/run/slurmd-%n.pid" logf="$DIR/log/slurmd-%n.log"
    nodes=$(for k in $(seq 1 "$NODES"); do
      echo "NodeName=node$k NodeAddr=$NET.$((k + 1)) CPUs=$((cpus / NODES > 0 ? cpus / NODES : 1)) RealMemory=$((mem / NODES)) State=UNKNOWN"
    done; echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP")
  fi
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$pidf
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$logf
TmpFS=$DIR/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=0                 # as strict sites do: a job comes back only if it asked for --requeue
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.sock
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$nodes
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

own_dir() {  # the cluster's folder must be a real folder of this user's
  if [ -L "$DIR" ] || { [ -e "$DIR" ] && [ "$(stat -c %u "$DIR")" != "$(id -u)" ]; }; then
    log "$DIR: a link or another user's folder; SLURM_LOCAL_DIR must name a folder of yours"; exit 2
  fi
}

need_dir() {
  if [ -z "$DIR" ]; then log "no local cluster in this shell (SLURM_LOCAL_DIR and SLURM_CONF are unset)"; exit 1; fi
  own_dir
}

cmd_up() {
  if [ -z "$DIR" ]; then DIR=$(mktemp -d "${TMPDIR:-/tmp}/adam-slurm.XXXXXXXX"); fi
  own_dir
  if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    log "already up in $DIR"; echo "export SLURM_CONF=$DIR/etc/slurm.conf SLURM_LOCAL_DIR=$DIR"; return
  fi
  find "$DIR" -mindepth 1 -delete 2>/dev/null || true
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  touch "$DIR/.adam-local-cluster"
  mkdir -p "$DIR"/{etc,state,spool,run,log,tmp,munge,mysql}
  chmod 700 "$DIR/munge"
  CTLD_PORT=$(free_port); SLURMD_PORT=$(free_port); DBD_PORT=$(free_port); DB_PORT=$(free_port)
  if [ "$NODES" -gt 1 ]; then network; fi
  write_confs
  export SLURM_CONF=$DIR/etc/slurm.conf

  # munge: private key and socket
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.sock" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  wait_for 10 munged test -S "$DIR/munge/munge.sock"

  # MariaDB for slurmdbd (sacct; submitit needs job states of killed jobs)
  mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal \
    >"$DIR/log/mariadb-install.log" 2>&1
  (setsid mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --port="$DB_PORT" --bind-address=127.0.0.1 \
    --socket="$DIR/run/mysql.sock" --pid-file="$DIR/run/mariadbd.pid" --skip-log-error \
    >"$DIR/log/mariadb.log" 2>&1 &)
  wait_for 30 mariadb mariadb --no-defaults -S "$DIR/run/mysql.sock" -u root -e "select 1"
  mariadb --no-defaults -S "$DIR/run/mysql.sock" -u root -e \
    "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; CREATE DATABASE slurm_acct_db;"

  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  slurmctld -i
  wait_for 30 slurmctld scontrol ping
  if [ "$NODES" -gt 1 ]; then
    for k in $(seq 1 "$NODES"); do start_node "$k"; done
  else
    slurmd -N localhost
  fi
  wait_for 60 "$NODES node(s) idle" bash -c "[ \$(sinfo -h -N -o %T | grep -c idle) -ge $NODES ]"
  log "up: $(sinfo -h -o '%P %D %T %c cpus') (state in $DIR)"
  echo "export SLURM_CONF=$SLURM_CONF SLURM_LOCAL_DIR=$DIR"
}

netns() { echo "adam-$(cut -d' ' -f1 "$DIR/net")-node$1"; }

start_node() {  # slurmd of nodeK in its namespaces (its jobs inherit them)
  mkdir -p "$DIR/spool/node$1"
  (setsid nsenter --net="/run/netns/$(netns "$1")" unshare --uts --mount --propagation private \
    bash -c "mount --bind '$DIR/etc/hosts' /etc/hosts && hostname node$1 && exec slurmd -N node$1" \
    >"$DIR/log/slurmd-start-node$1.log" 2>&1 &)
}

cmd_restart_node() {  # a node whose slurmd was killed (a test of a lost node): started again, resumed
  need_dir
  export SLURM_CONF=$DIR/etc/slurm.conf
  case "${1:-}" in [1-4]) ;; *) log "restart-node ${1:-}: allowed values are 1 to 4"; exit 2 ;; esac
  [ -f "$DIR/net" ] || { log "restart-node: this cluster has one node (up --nodes N makes several)"; exit 2; }
  rm -f "$DIR/run/slurmd-node$1.pid"
  start_node "$1"
  wait_for 60 "node$1 to answer" bash -c "! sinfo -h -n node$1 -o %T | grep -q '\*'"
  scontrol update nodename="node$1" state=resume 2>/dev/null || true
  wait_for 60 "node$1 idle or busy" bash -c "sinfo -h -n node$1 -o %T | grep -Eq '^(idle|mixed|allocated)$'"
  log "node$1 up again"
}

network() {  # a bridge at $NET.1 and, per node, a network namespace with a veth pair into it
  if [ "$(id -u)" != 0 ]; then log "--nodes $NODES: network namespaces need root"; exit 2; fi
  local tag k ns
  tag=$(basename "$DIR" | tr -dc 'a-zA-Z0-9' | tail -c 6)
  for _ in $(seq 1 20); do  # a /24 of 198.18.0.0/15 (RFC 2544, for tests) that no interface here uses
    NET=198.$((18 + RANDOM % 2)).$((RANDOM % 250 + 1))
    ip -4 -o addr show | grep -q " $NET\." || break
  done
  echo "$tag $NET $NODES" >"$DIR/net"
  ip link add "adbr$tag" type bridge
  ip addr add "$NET.1/24" dev "adbr$tag"
  ip link set "adbr$tag" up
  printf '127.0.0.1 localhost\n%s %s\n' "$NET.1" "$(hostname -s)" >"$DIR/etc/hosts"
  for k in $(seq 1 "$NODES"); do
    ns=$(netns "$k")
    ip netns add "$ns"
    ip link add "ad$tag$k" type veth peer name eth0 netns "$ns"
    ip link set "ad$tag$k" master "adbr$tag"
    ip link set "ad$tag$k" up
    ip -n "$ns" addr add "$NET.$((k + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    printf '%s node%s\n' "$NET.$((k + 1))" "$k" >>"$DIR/etc/hosts"
  done
}

cmd_down() {
  need_dir
  for d in "${DAEMONS[@]}"; do
    local pidf="$DIR/run/$d.pid"
    [ -f "$pidf" ] || continue
    local pid; pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"
  done
  if [ -f "$DIR/net" ]; then  # the namespaces and the bridge of --nodes N
    local tag n k
    read -r tag _ n <"$DIR/net"
    for k in $(seq 1 "$n"); do ip netns del "adam-$tag-node$k" 2>/dev/null || true; done
    ip link del "adbr$tag" 2>/dev/null || true
    rm -f "$DIR/net"
  fi
  log "down"
}

cmd_status() {
  need_dir
  export SLURM_CONF=$DIR/etc/slurm.conf
  for d in "${DAEMONS[@]}"; do
    local pidf="$DIR/run/$d.pid"
    if [ "$d" != "${d#slurmd-}" ] && [ ! -f "$pidf" ]; then continue; fi  # a node this cluster does not have
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then echo "$d: running ($(cat "$pidf"))"; else echo "$d: stopped"; fi
  done
  sinfo 2>/dev/null || true
}

cmd_running() {
  [ -n "$DIR" ] || return 1
  [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null &&
    SLURM_CONF=$DIR/etc/slurm.conf scontrol ping >/dev/null 2>&1
}

case "${1:-}" in
  install) cmd_install ;;
  running) cmd_running ;;
  up)
    if [ "${2:-}" = --nodes ]; then
      case "${3:-}" in [1-4]) NODES=$3 ;; *) log "--nodes ${3:-}: allowed values are 1 to 4"; exit 2 ;; esac
    elif [ -n "${2:-}" ]; then log "up ${2}: allowed: up [--nodes N]"; exit 2; fi
    cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart-node) cmd_restart_node "${2:-}" ;;
  env) need_dir; echo "export SLURM_CONF=$DIR/etc/slurm.conf SLURM_LOCAL_DIR=$DIR" ;;
  *) echo "usage: $0 install|up [--nodes N]|down|status|running|env|restart-node K" >&2; exit 2 ;;
esac

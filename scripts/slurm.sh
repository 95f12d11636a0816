#!/usr/bin/env bash
# A real single-node SLURM on localhost for the tests and CI: slurmctld, slurmd, slurmdbd + MariaDB
# (accounting, so sacct works), munge. Debian's packages, as root, no systemd, no cgroups.
#   bash scripts/slurm.sh start            # idempotent; a cluster already up is left as it is
#   bash scripts/slurm.sh status           # daemons (by pid file) and sinfo; exit 0 when it takes jobs
#   bash scripts/slurm.sh stop [--purge]   # stop by pid file (never by process name); --purge: delete
#                                          # $SLURM_BASE (job state, accounting database)
# Exit status of start: 0 up; 3 cannot start here (not root, no apt-get, ...): the reason is printed
# and SLURM tests skip.
# Env: SLURM_BASE (state, logs, database; default /tmp/local-slurm), SLURM_ACCOUNTING=0 (no slurmdbd:
# lighter, but sacct fails and submitit cannot see a killed job as finished).
set -euo pipefail
BASE="${SLURM_BASE:-/tmp/local-slurm}"
ACCT="${SLURM_ACCOUNTING:-1}"
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf
MUNGE_PID=/run/munge/munged.pid
DB_PID="$BASE/mysqlrun/mariadb.pid"

say() { echo "slurm.sh: $*" >&2; }
cannot() { say "cannot start SLURM here: $*"; exit 3; }
# a live pid in the file; ps, not kill -0: a user who is not root may not signal root's daemons, which are
# alive all the same
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && ps -p "$pid" >/dev/null 2>&1; }
retry() {  # retry N CMD...: up to N tries 0.1 s apart, quietly; the last try shows its output
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}
stop_pidfile() {  # TERM, wait up to 10 s, then KILL; only the pid in the file
  [ -s "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}
node_up() { sinfo -h -N -n localhost -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc|comp)'; }
is_up() {  # takes jobs, and (with accounting) slurmdbd answers
  command -v sinfo >/dev/null 2>&1 || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  node_up || return 1
  if [ "$ACCT" = 1 ]; then sacctmgr -n list cluster >/dev/null 2>&1 || return 1; fi
  return 0
}

install_packages() {
  local pkgs="slurmctld slurmd slurm-client munge" missing=""
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null 2>&1 || cannot "packages missing ($missing) and no apt-get"
  say "installing$missing"
  apt-get update -qq || cannot "apt-get update failed (no network?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || cannot "apt-get install$missing failed"
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  # up to 3 starts: a munged killed a moment ago may still hold its socket lock, and a new one then exits
  for _ in 1 2 3; do
    if ! alive "$MUNGE_PID"; then
      rm -f "$MUNGE_PID"
      runuser -u munge -- /usr/sbin/munged --force   # --force: a stale socket from a killed munged is fine
    fi
    retry 50 sh -c 'munge -n </dev/null | unmunge' >/dev/null 2>&1 && return 0
    sleep 1
  done
  retry 1 sh -c 'munge -n </dev/null | unmunge' >/dev/null
}

write_if_changed() {  # write_if_changed FILE < content: 0 when it changed
  cat > "$1.new"
  if cmp -s "$1.new" "$1"; then rm -f "$1.new"; return 1; fi
  mv "$1.new" "$1"
}

slurm_conf() {
  local cpus mem acct
  cpus=$(nproc)
  mem=$(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
  mem=$(( mem * 9 / 10 ))   # a RealMemory above what slurmd detects drains the node
  if [ "$ACCT" = 1 ]; then
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux"
  else
    acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
  fi
  cat <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
ReturnToService=2
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
$acct
JobCompType=jobcomp/none
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
SlurmdTimeout=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_accounting() {
  install -d -o mysql -g mysql "$BASE/mysql" "$BASE/mysqlrun" /run/mysqld
  if [ ! -d "$BASE/mysql/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$BASE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket > "$BASE/log/mariadb-install.log" 2>&1 \
      || cannot "mariadb-install-db failed (see $BASE/log/mariadb-install.log)"
  fi
  if ! alive "$DB_PID"; then
    rm -f /run/mysqld/mysqld.sock
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql" \
      --socket=/run/mysqld/mysqld.sock --pid-file="$DB_PID" --log-error="$BASE/mysqlrun/mariadb.log" \
      --skip-networking --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
  fi
  retry 300 mariadb -uroot -e 'select 1' >/dev/null
  local old_umask; old_umask=$(umask); umask 077
  if write_if_changed "$DBDCONF" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  then stop_pidfile "$BASE/run/slurmdbd.pid"; fi
  umask "$old_umask"
  chmod 600 "$DBDCONF"   # slurmdbd refuses a conf others can read
  alive "$BASE/run/slurmdbd.pid" || slurmdbd
  retry 300 sacctmgr -n list cluster >/dev/null
  sacctmgr -n -P list cluster format=cluster | grep -qx local || sacctmgr -i add cluster local >/dev/null
}

start() {
  if is_up; then say "already up"; sinfo; return 0; fi
  [ "$(id -u)" = 0 ] || cannot "not root (the daemons and Debian's packages need root)"
  command -v dpkg >/dev/null 2>&1 || cannot "not a Debian system (no dpkg)"
  install_packages
  start_munge
  mkdir -p "$BASE"/{state,spool,log,run} /etc/slurm
  local changed=0
  slurm_conf | write_if_changed "$CONF" && changed=1
  [ "$ACCT" = 1 ] && start_accounting
  # a changed slurm.conf needs both daemons restarted (else "different slurm.conf" and odd behaviour)
  if [ "$changed" = 1 ]; then stop_pidfile "$BASE/run/slurmd.pid"; stop_pidfile "$BASE/run/slurmctld.pid"; fi
  alive "$BASE/run/slurmctld.pid" || slurmctld
  retry 100 scontrol ping >/dev/null
  alive "$BASE/run/slurmd.pid" || slurmd -N localhost   # -N: the node name, whatever the hostname
  retry 200 node_up || cannot "the node does not take jobs (see $BASE/log/slurmd.log, slurmctld.log)"
  sinfo
}

status() {
  local f
  for f in "$MUNGE_PID" "$DB_PID" "$BASE/run/slurmdbd.pid" "$BASE/run/slurmctld.pid" "$BASE/run/slurmd.pid"; do
    if alive "$f"; then echo "up    $(basename "$f" .pid) (pid $(cat "$f"))"
    elif [ -e "$f" ] && [ ! -r "$f" ]; then echo "?     $(basename "$f" .pid) (cannot read $f: not root)"
    else echo "down  $(basename "$f" .pid)"; fi
  done
  if is_up; then sinfo; return 0; fi
  echo "SLURM does not take jobs"
  return 1
}

stop() {
  [ "$(id -u)" = 0 ] || { say "not root: nothing stopped"; return 1; }
  stop_pidfile "$BASE/run/slurmd.pid"
  stop_pidfile "$BASE/run/slurmctld.pid"
  stop_pidfile "$BASE/run/slurmdbd.pid"
  stop_pidfile "$DB_PID"
  stop_pidfile "$MUNGE_PID"
  if [ "${1:-}" = "--purge" ]; then rm -rf "$BASE"; say "purged $BASE"; fi
  return 0
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "${1:-}" ;;
  status) status ;;
  *) echo "usage: $0 start | stop [--purge] | status" >&2; exit 2 ;;
esac

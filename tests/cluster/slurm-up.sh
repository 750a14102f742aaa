#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine for tests/test_slurm.py.
#
# Debian 12, run as root, no systemd: installs slurm + munge with apt-get if they are missing,
# writes /etc/slurm/slurm.conf for one node named after `hostname -s` (all CPUs, 90% of the memory,
# two fake GPUs as gres so that `gpu=1` / `gres=gpu:1` requests are accepted), starts munged,
# slurmctld and slurmd by hand and waits until the node is idle and `srun true` works.
# No accounting database: tests/test_slurm.py adds `slurm-status-command: squeue` (and the
# partition `debug`) to its copy of the Snakemake profile.
#
# State, logs and pid files live in $SLURM_STATE (default /tmp/omniseg-slurm); slurm-down.sh stops
# exactly the daemons whose pid files this script wrote there. An existing slurm.conf that this
# script did not write is never overwritten (this is not meant for a real cluster).
set -euo pipefail

S=${SLURM_STATE:-/tmp/omniseg-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by omniseg tests/cluster/slurm-up.sh"
export DEBIAN_FRONTEND=noninteractive
step() { echo "[slurm-up $(date +%T)] $*"; }
die() { echo "[slurm-up] error: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
fi
if alive "$S/slurmctld.pid" || alive "$S/slurmd.pid"; then
    die "a test cluster from $S is already running; run tests/cluster/slurm-down.sh first"
fi
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "slurmctld/slurmd already run on this machine (not from $S); not starting a second cluster"
fi

# On any failure below, stop whatever this script already started.
cleanup() {
    echo "[slurm-up] failed; stopping what was started" >&2
    SLURM_STATE="$S" bash "$(dirname "$0")/slurm-down.sh" || true
}
trap 'rc=$?; [ "$rc" = 0 ] || cleanup' EXIT

missing=""
for exe in slurmctld slurmd sbatch munged; do
    command -v "$exe" >/dev/null || [ -x "/usr/sbin/$exe" ] || missing=1
done
if [ -n "$missing" ]; then
    step "installing slurm + munge (apt-get)"
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

H=$(hostname -s)
getent hosts "$H" >/dev/null || echo "127.0.0.1 $H" >> /etc/hosts
CPUS=$(nproc)
MEM=$(/usr/sbin/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$((MEM * 9 / 10))
# A fresh state every time: jobs saved by an earlier (killed) test cluster would otherwise be
# recovered and keep the node from becoming idle.
rm -rf "$S"/ctld "$S"/spool
mkdir -p "$S"/ctld "$S"/spool "$S"/log
# Fake GPUs: character devices equal to /dev/null; jobs see them through gres, never use them.
rm -f "$S"/fakegpu0 "$S"/fakegpu1
mknod "$S/fakegpu0" c 1 3
mknod "$S/fakegpu1" c 1 3

step "munge"
[ -s /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    step "munged already running (not started here, will not be stopped)"
else
    rm -f /run/munge/omniseg-munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/omniseg-munged.pid
    timeout 10 bash -c 'until [ -s /run/munge/omniseg-munged.pid ]; do sleep 0.1; done'
    cp /run/munge/omniseg-munged.pid "$S/munged.pid"
    munge -n | unmunge >/dev/null || die "munge does not work"
fi

step "writing $CONF for node $H ($CPUS CPUs, $MEM MB, 2 fake GPUs)"
mkdir -p /etc/slurm
cat > "$CONF" <<EOF
$MARK
ClusterName=omniseg-ci
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job that asks no memory would take the whole node.
DefMemPerCPU=500
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to squeue for an hour (the plugin's squeue status checks need it).
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
NodeName=$H CPUs=$CPUS RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/gres.conf <<EOF
$MARK
NodeName=$H Name=gpu File=$S/fakegpu[0-1]
EOF

step "slurmctld + slurmd"
/usr/sbin/slurmctld -i
/usr/sbin/slurmd
if ! timeout 60 bash -c 'until sinfo -h -o %t 2>/dev/null | grep -qx idle; do sleep 0.5; done'; then
    sinfo -R || true
    tail -n 20 "$S/log/slurmctld.log" "$S/log/slurmd.log" || true
    die "node $H did not become idle within 60 s"
fi

step "smoke test"
timeout 60 srun -t 1 true || die "srun true failed"
timeout 60 srun -t 1 --gres=gpu:1 true || die "srun with a GPU request failed"
sinfo
trap - EXIT
step "cluster up (state in $S)"

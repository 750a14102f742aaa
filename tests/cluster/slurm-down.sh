#!/usr/bin/env bash
# Stop the daemons that tests/cluster/slurm-up.sh started, by the pid files it left in
# $SLURM_STATE (default /tmp/omniseg-slurm). Nothing else is touched: a munged that was already
# running before slurm-up.sh has no pid file there and keeps running.
set -uo pipefail

S=${SLURM_STATE:-/tmp/omniseg-slurm}
status=0
for name in slurmd slurmctld munged; do
    f="$S/$name.pid"
    [ -s "$f" ] || continue
    p=$(cat "$f")
    # Only a live process of that name: a stale pid file may point at a reused pid.
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$name" ]; then
        kill "$p" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then
            kill -9 "$p" 2>/dev/null || status=1
        fi
        echo "[slurm-down] stopped $name ($p)"
    fi
    rm -f "$f"
done
exit "$status"

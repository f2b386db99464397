#!/usr/bin/env bash
# Stop what slurm/local/start.sh started: cancel the cluster's jobs, then slurmd, slurmctld and munged,
# each by the pid in its own pid file (never by name: other Slurms or mungeds may run on this machine).
set -uo pipefail

DIR=${WITSCALE_SLURM_DIR:-/tmp/witscale-slurm}
export SLURM_CONF=$DIR/slurm.conf

stop_pidfile() {   # stop_pidfile FILE: TERM, wait up to 10 s, then KILL
    local f=$1 pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$f"
}

if [ -f "$SLURM_CONF" ] && [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs 2>/dev/null
        # let slurmstepd end the jobs' processes before slurmd goes away
        for _ in $(seq 1 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
    fi
fi
for f in "$DIR"/slurmd-*.pid; do
    [ -e "$f" ] && stop_pidfile "$f"
done
stop_pidfile "$DIR/slurmctld.pid"
stop_pidfile "$DIR/munge/munged.pid"
echo "stop.sh: stopped (state left in $DIR)"

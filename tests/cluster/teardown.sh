#!/usr/bin/env bash
# Stop the SLURM daemons that tests/cluster/setup.sh started, by the PIDs it recorded, and nothing else.
# Jobs still on that cluster are cancelled first so that no job step outlives its slurmd.
# Environment: PHYSIS_SLURM_STATE (default /run/physis-slurm), as for setup.sh.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

if [[ ! -s $PIDS ]]; then
    say "nothing to stop (no $PIDS)"
    exit 0
fi

declare -A pid_of
while read -r name pid; do pid_of[$name]=$pid; done <"$PIDS"

if [[ -n ${pid_of[slurmctld]:-} ]] && pid_alive slurmctld "${pid_of[slurmctld]}"; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        say "cancelling jobs $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs || true
        deadline=$((SECONDS + 15))
        while [[ -n $(timeout 5 squeue -h -o %A 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
fi

# slurmd before slurmctld before munged: each depends on the next.
for name in slurmd slurmctld munged; do
    pid=${pid_of[$name]:-}
    [[ -n $pid ]] || continue
    if ! pid_alive "$name" "$pid"; then
        say "$name ($pid) already gone"
        continue
    fi
    kill -TERM "$pid"
    # slurmctld saves its state on the way out: about 4 s.
    for _ in $(seq 300); do
        pid_alive "$name" "$pid" || break
        sleep 0.1
    done
    if pid_alive "$name" "$pid"; then
        say "$name ($pid) ignored SIGTERM for 30 s: SIGKILL"
        kill -KILL "$pid" || true
    fi
    say "stopped $name ($pid)"
done
rm -f "$PIDS"

# Shared by setup.sh and teardown.sh (sourced): where the PIDs of the daemons setup.sh started are kept,
# and how to tell that one of them still runs.
STATE=${PHYSIS_SLURM_STATE:-/run/physis-slurm}
PIDS=$STATE/pids

say() { echo "physis-slurm: $*"; }

pid_alive() { # name pid: the process runs (a zombie does not) and is still that daemon (PIDs get reused)
    [[ -r /proc/$2/status ]] && [[ $(cat "/proc/$2/comm") == "$1" ]] && ! grep -q '^State:\s*Z' "/proc/$2/status"
}

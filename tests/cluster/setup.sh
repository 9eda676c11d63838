#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine for the cluster tests (tests/test_cluster.py):
# munged + slurmctld + slurmd from Debian's packages, one node with a fake GPU, no systemd, no cgroups,
# no accounting database. Each setting that works around a gotcha says which, where it is made.
#
# Usage (as root, Debian 12 or similar):  tests/cluster/setup.sh      then  tests/cluster/teardown.sh
#
# Idempotent: if the daemons this script started are still running with the same configuration it only
# waits for the node to be idle; a changed configuration restarts them. It never stops or reconfigures a
# SLURM it did not start: an existing foreign /etc/slurm/slurm.conf or a running foreign slurmctld/slurmd
# is an error.
#
# Environment:
#   PHYSIS_SLURM_STATE  folder for the PID file (default /run/physis-slurm); teardown.sh reads it
#   FAKE_GPUS           number of fake GPUs on the node (default 1)
#   RESET_STATE=1       start slurmctld with a clean job/node state (-c)
#
# Last line of stdout: "physis-slurm: started" (this call started the daemons) or "physis-slurm: reused".
# Exit status: 0 cluster ready; 77 SLURM cannot be installed or run here (the tests skip, quoting the
# reason); anything else: a real failure.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
FAKE_GPUS=${FAKE_GPUS:-1}
RESET_STATE=${RESET_STATE:-0}
PACKAGES=(slurmctld slurmd slurm-client munge)
MARKER="# written by physis tests/cluster/setup.sh"
NODE=$(hostname -s)

die() { echo "physis-slurm: error: $*" >&2; exit 1; }
cannot() { echo "physis-slurm: cannot run SLURM here: $*" >&2; exit 77; }

[[ $EUID -eq 0 ]] || cannot "needs root (installs packages, writes /etc/slurm, starts daemons)"

# --- 1. packages ----------------------------------------------------------------------------------------
have_binaries() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null
if ! have_binaries; then
    command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munge are not installed and there is no apt-get"
    # Package postinsts must not start services (that would be daemons this script did not start).
    # Debian's Docker-style images already ship a policy-rc.d that says no; add a temporary one otherwise.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    say "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
    log=$(mktemp)
    # A failed update (one unreachable mirror) may still leave usable package lists: try the install.
    # The lock timeout waits for a parallel apt-get (the browser tests may install chromium).
    lock=(-o DPkg::Lock::Timeout=600)
    if ! { apt-get "${lock[@]}" update -qq || true; DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install \
            -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
        [[ $own_policy == 1 ]] && rm -f "$policy"
        tail -n 5 "$log" >&2
        cannot "apt-get could not install ${PACKAGES[*]} (offline or not Debian?)"
    fi
    [[ $own_policy == 1 ]] && rm -f "$policy"
    rm -f "$log"
    have_binaries || die "packages installed but the SLURM/munge binaries are still missing"
fi
# On systemd hosts the packages may have started their own units; those are not ours to stop.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    for unit in slurmctld slurmd; do
        systemctl is-active --quiet "$unit" && die "systemd unit $unit is active; stop it first (systemctl stop $unit)"
    done
fi

# --- 2. configuration -----------------------------------------------------------------------------------
CONF_DIR=/etc/slurm
[[ -d /etc/slurm-llnl && ! -d /etc/slurm ]] && CONF_DIR=/etc/slurm-llnl # very old packages
mkdir -p "$CONF_DIR"
if [[ -e $CONF_DIR/slurm.conf ]] && ! grep -qxF "$MARKER" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf exists and was not written by this script; not touching a real SLURM setup"
fi

cpus=$(nproc)
# Memory is only used for scheduling (no cgroups, nothing enforces it): declare 90 % of the machine.
mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
gpu_last=$((FAKE_GPUS - 1))
fake_dir=/var/lib/slurm/fakegpu

new_conf=$(mktemp)
new_gres=$(mktemp)
trap 'rm -f "$new_conf" "$new_gres"' EXIT
cat >"$new_conf" <<EOF
$MARKER
# One node, one partition, a fake GPU. No slurmdbd: sacct does not work, squeue does.
ClusterName=physisci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups: track processes by /proc, no binding, no memory enforcement (time limits still apply).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Finished jobs stay visible to 'squeue --states=all' for 10 min: longer than Snakemake's longest
# status-poll interval (180 s), and >= 3 x its first-poll delay, else the plugin falls back to sacct.
MinJobAge=600
# A job over its time limit gets SIGTERM, then SIGKILL after KillWait s (default 30; short for tests).
KillWait=5
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# A count-only GPU declaration drains the node ("count reported lower than configured"): each fake GPU
# needs a device file that exists; symlinks to /dev/null do.
cat >"$new_gres" <<EOF
$MARKER
AutoDetect=off
NodeName=$NODE Name=gpu File=$fake_dir/gpu[0-$gpu_last]
EOF

# --- 3. already running? ----------------------------------------------------------------------------------
running_pids() { # name: live processes of that name (a just-stopped daemon lingers as a zombie)
    local pid
    for pid in $(pgrep -x "$1"); do pid_alive "$1" "$pid" && echo "$pid"; done
    return 0
}
ours_running() {
    [[ -r $PIDS ]] || return 1
    local name pid n=0
    while read -r name pid; do
        pid_alive "$name" "$pid" || return 1
        n=$((n + 1))
    done <"$PIDS"
    ((n > 0))
}
wait_idle() {
    local state deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
        case $state in
        idle | mixed | allocated) return 0 ;;
        *drain* | *inval* | *down* | *fail*)
            # A drained state survives restarts in StateSaveLocation; we fixed the cause, so resume.
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    die "node $NODE did not become idle within 60 s (state: ${state:-no answer})"
}

same_conf=0
cmp -s "$new_conf" "$CONF_DIR/slurm.conf" && cmp -s "$new_gres" "$CONF_DIR/gres.conf" && same_conf=1
if ours_running; then
    if [[ $same_conf == 1 && $RESET_STATE != 1 ]]; then
        wait_idle
        say "reused (PIDs in $PIDS)"
        exit 0
    fi
    say "configuration changed: restarting the daemons this script started"
    "$(dirname "$0")/teardown.sh"
elif [[ -s $PIDS ]]; then
    say "a daemon this script started has died: stopping the others, starting afresh"
    "$(dirname "$0")/teardown.sh"
fi
for daemon in slurmctld slurmd; do
    foreign=$(running_pids "$daemon")
    [[ -z $foreign ]] || die "a $daemon not started by this script is running (pid $(echo $foreign))"
done

install -m 644 "$new_conf" "$CONF_DIR/slurm.conf"
install -m 644 "$new_gres" "$CONF_DIR/gres.conf"
# slurmd >= 24.05 wants cgroups unless told otherwise; older versions reject the key.
version=$(slurmd -V | awk '{print $2}')
if [[ $(printf '%s\n' 24.05 "$version" | sort -V | head -n 1) == 24.05 ]]; then
    printf '%s\nCgroupPlugin=disabled\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
fi

id slurm >/dev/null 2>&1 || die "user slurm missing (the slurm packages create it)"
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm /run/slurm
install -d "$fake_dir"
rm -f "$fake_dir"/gpu*
for ((i = 0; i < FAKE_GPUS; i++)); do ln -s /dev/null "$fake_dir/gpu$i"; done

# --- 4. start the daemons ---------------------------------------------------------------------------------
mkdir -p "$STATE"
: >"$PIDS"
wait_pidfile() { # file: the daemon writes it after forking into the background
    local deadline=$((SECONDS + 20))
    until [[ -s $1 ]]; do
        ((SECONDS < deadline)) || die "no PID file $1 after 20 s"
        sleep 0.05
    done
    cat "$1"
}

if [[ -n $(running_pids munged) ]]; then
    say "using the munged that is already running (not ours: teardown leaves it alone)"
else
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
            chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
        fi
    fi
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    echo "munged $(wait_pidfile /run/munge/munged.pid)" >>"$PIDS"
fi

rm -f /run/slurm/slurmctld.pid /run/slurm/slurmd.pid
ctld_args=()
[[ $RESET_STATE == 1 ]] && ctld_args=(-c)
/usr/sbin/slurmctld "${ctld_args[@]}"
echo "slurmctld $(wait_pidfile /run/slurm/slurmctld.pid)" >>"$PIDS"
/usr/sbin/slurmd
echo "slurmd $(wait_pidfile /run/slurm/slurmd.pid)" >>"$PIDS"

wait_idle

# --- 5. smoke test: a GPU step sees the device SLURM assigned --------------------------------------------
cuda=$(timeout 60 srun --gpus=1 -t 1 printenv CUDA_VISIBLE_DEVICES) || die "srun --gpus=1 failed"
[[ $cuda == 0 ]] || die "srun --gpus=1 saw CUDA_VISIBLE_DEVICES='$cuda', expected 0"
say "node $NODE idle: $cpus CPUs, $mem_mb MB, $FAKE_GPUS fake GPU(s); partition debug"
say "started (PIDs in $PIDS)"

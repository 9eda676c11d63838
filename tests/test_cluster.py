"""`snakemake --profile slurm-gpu` against a real SLURM cluster: one node with a fake GPU, installed and
started by tests/cluster/setup.sh for the session and stopped by tests/cluster/teardown.sh (by PID).

Every Snakemake run goes through `timeout -k 10 <limit>`: a status check that hangs (the plugin's sacct
default on a cluster without accounting) must fail the test, never hang CI. Skipped, with the reason, only
where SLURM cannot be installed or run (not root, no apt, offline).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "cluster"
FIXTURE = CLUSTER / "fixture" / "Snakefile"
GPU_CHECK = CLUSTER / "fixture" / "gpu_check.smk"
TINY = ROOT / "tests" / "config" / "tiny.yaml"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# Poll SLURM 2 s after each submission instead of the profile's 20: same code path, shorter test.
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "10"]

# One xdist worker for every test that uses the machine's one SLURM (setup/teardown are global).
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local one-node cluster; torn down at the end of the session if this session started it."""
    try:
        setup = subprocess.run([CLUSTER / "setup.sh"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tests/cluster/setup.sh took over 300 s:\n{e.stdout}\n{e.stderr}")
    output = setup.stdout + setup.stderr
    if setup.returncode == 77:
        pytest.skip(output.strip().splitlines()[-1])
    if setup.returncode != 0:
        pytest.fail(f"tests/cluster/setup.sh failed ({setup.returncode}):\n{output}")
    started = setup.stdout.strip().splitlines()[-1].startswith("physis-slurm: started")
    yield
    if started:
        subprocess.run([CLUSTER / "teardown.sh"], timeout=120, check=False)


@dataclass
class SlurmJob:
    id: str
    run: str  # job name = Snakemake's SLURM run ID
    comment: str  # rule_<rule>[_wildcards_<values>]
    tres_per_job: str  # gres:gpu:1 for --gpus=1, N/A without
    state: str
    time_limit: str
    time_used: str  # [days-][hours:]minutes:seconds


def seconds(elapsed: str) -> int:
    """SLURM's [days-][hours:]minutes:seconds in seconds."""
    days, _, clock = elapsed.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total + int(days or 0) * 86400


def slurm_jobs(run_id: str) -> list[SlurmJob]:
    """This run's jobs, finished ones included (MinJobAge keeps them 10 min)."""
    fields = ("JobID", "Name", "Comment", "tres-per-job", "State", "TimeLimit", "TimeUsed")
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-O", ",".join(f"{f}:|" for f in fields)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    jobs = [SlurmJob(*line.split("|")[: len(fields)]) for line in out.splitlines() if line.strip()]
    return sorted((j for j in jobs if j.run == run_id), key=lambda j: int(j.id))


def snakemake(args: list, *, limit: int, profile: str = "slurm-gpu", fails: bool = False) -> tuple[str, float]:
    """Run Snakemake from the repository root (where the README runs it) under a hard timeout.

    Returns the output and the wall time; fails the test on any error (or, with ``fails``, when Snakemake
    succeeds), with the output and the queue.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "PHYSIS_SLURM_", "SNAKEMAKE_PROFILE"))}
    command = ["timeout", "-k", "10", str(limit), SNAKEMAKE, "--profile", profile, *args]
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit + 30)
    wall = time.monotonic() - start
    output = result.stdout + result.stderr
    if fails and result.returncode == 0:
        pytest.fail(f"snakemake --profile {profile} succeeded, but a job should have failed:\n{output[-6000:]}")
    if result.returncode != 0 and not (fails and result.returncode == 1):
        queue = subprocess.run(["squeue", "--states=all", "-l"], capture_output=True, text=True, timeout=30).stdout
        if result.returncode in (124, 137):
            subprocess.run(["scancel", "--full", *re.findall(r"SLURM jobid (\d+)", output)], timeout=30)
            pytest.fail(f"snakemake --profile {profile} ran past its {limit} s limit (a hung status check?):\n"
                        f"{output[-6000:]}\n{queue}")
        pytest.fail(f"snakemake --profile {profile} failed ({result.returncode}):\n{output[-6000:]}\n{queue}")
    return output, wall


def run_id(output: str) -> str:
    return re.search(r"SLURM run ID: (\S+)", output).group(1)


def logged(log: Path, variable: str) -> str | None:
    """The value of `VARIABLE=value` in a train log (the train script logs it first thing)."""
    match = re.search(rf"\b{variable}=(\S*)", log.read_text())
    return match.group(1) if match else None


def test_gpu_only_for_train_jobs(slurm_cluster, tmp_path):
    """The profile submits through sbatch; the train job gets --gpus=1 and sees the GPU, prepare does not."""
    output, _ = snakemake(["--snakefile", FIXTURE, "--directory", tmp_path, *FAST_POLL], limit=300)
    jobs = {job.comment: job for job in slurm_jobs(run_id(output))}
    assert set(jobs) == {"rule_prepare", "rule_train_wildcards_a"}, jobs
    assert all(job.state == "COMPLETED" for job in jobs.values()), jobs
    assert jobs["rule_train_wildcards_a"].tres_per_job == "gres:gpu:1"
    assert jobs["rule_prepare"].tres_per_job == "N/A"
    log = tmp_path / "logs" / "train" / "a.log"
    train_id = jobs["rule_train_wildcards_a"].id
    assert logged(log, "CUDA_VISIBLE_DEVICES") == "0"
    assert logged(log, "SLURM_JOB_ID") == train_id
    # The profile keeps successful jobs' SLURM logs: the proof stays on disk.
    assert (tmp_path / ".snakemake" / "slurm_logs" / "rule_train" / "a" / f"{train_id}.log").exists()


def test_gpu_check_in_a_slurm_job_granted_a_gpu(slurm_cluster, tmp_path):
    """SLURM grants each stand-in train job the node's (fake) GPU, which TensorFlow cannot see: with
    train.require_gpu auto the job fails at once, naming CUDA_VISIBLE_DEVICES, the job id, the TensorFlow
    build and the fix; with false it warns and carries on. Nothing is trained (physis's check only)."""
    output, _ = snakemake(["--snakefile", GPU_CHECK, "--directory", tmp_path, *FAST_POLL, "--retries", "0"],
                          limit=300, fails=True)
    jobs = {job.comment.removeprefix("rule_gpu_check_wildcards_"): job for job in slurm_jobs(run_id(output))}
    assert set(jobs) == {"auto", "false"}, jobs
    assert all(job.tres_per_job == "gres:gpu:1" for job in jobs.values()), jobs
    assert [jobs["auto"].state, jobs["false"].state] == ["FAILED", "COMPLETED"], jobs
    assert seconds(jobs["auto"].time_used) < 60, f"the check must fail at once, not after {jobs['auto'].time_used}"

    failed = (tmp_path / "logs" / "gpu_check" / "auto.log").read_text()
    for part in ("GPUUnavailableError", "granted 1 GPU(s) by SLURM", f"job {jobs['auto'].id}",
                 "CUDA_VISIBLE_DEVICES=0", "TensorFlow 2.20", "make setup GPU=1", "require_gpu: false"):
        assert part in failed, (part, failed)
    assert not (tmp_path / "gpu_check" / "auto.json").exists()

    warned = (tmp_path / "logs" / "gpu_check" / "false.log").read_text()
    assert re.search(r"WARNING physis\.devices: .*granted 1 GPU\(s\) by SLURM.*require_gpu is false: training on "
                     r"the CPU", warned), warned
    record = json.loads((tmp_path / "gpu_check" / "false.json").read_text())
    assert (record["type"], record["gpus_granted"], record["gpus_visible"]) == ("CPU", 1, 0)
    assert record["slurm_job_id"] == jobs["false"].id and record["cuda_visible_devices"] == "0"


def test_train_killed_at_time_limit_resumes_from_checkpoint(slurm_cluster, tmp_path):
    """runtime=1 (sbatch -t 1) and 100 s of training: SLURM kills the first job 60-90 s in (it checks
    limits every 30 s), Snakemake resubmits it (retries), and the second job continues from the
    checkpoint of the last finished epoch and completes (at most 45 s left, under its own limit)."""
    config = ["epochs=50", "epoch_seconds=2", "runtime=1", "retries=2"]
    output, _ = snakemake(["--snakefile", FIXTURE, "--directory", tmp_path, *FAST_POLL, "--config", *config], limit=600)
    train = [job for job in slurm_jobs(run_id(output)) if job.comment == "rule_train_wildcards_a"]
    assert [job.state for job in train] == ["TIMEOUT", "COMPLETED"], train
    assert all(job.time_limit == "1:00" and job.tres_per_job == "gres:gpu:1" for job in train), train
    summary = json.loads((tmp_path / "models" / "a" / "train_summary.json").read_text())
    first, second = summary["attempts"]
    assert [first["slurm_job_id"], second["slurm_job_id"]] == [job.id for job in train]
    assert first["from_epoch"] == 0
    assert 0 < second["from_epoch"] < 50, "the resubmitted job must start from the checkpoint, not from scratch"
    assert summary["epoch"] == 50


# Outputs that record wall-clock time or timestamps (training seconds, cost columns, zip dates, event
# file names): they must exist after both runs but cannot be byte-identical. Everything else must be.
TIMED_OUTPUTS = ("models/*/model.keras", "models/*/train_summary.json", "models/*/tensorboard/*/*",
                 "leaderboard.*", "figures/*/model_card.html", "figures/comparison/cost.png")


def result_files(results: Path) -> dict[str, Path]:
    """Outputs by relative path, without the per-run records (logs, benchmarks: times and hosts differ);
    TensorBoard event files are named after the time and PID that wrote them: keep only their folder."""
    files = {}
    for path in sorted(results.rglob("*")):
        relative = path.relative_to(results)
        if path.is_file() and relative.parts[0] not in {"logs", "benchmarks"}:
            files[re.sub(r"events\.out\.tfevents\..*", "events", str(relative))] = path
    return files


def run_local_and_slurm(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """The tiny config with `--profile local`, then with `--profile slurm-gpu`, into the same paths (file
    paths are recorded in the outputs), each run's folder moved aside after it: profile -> (results, output)."""
    runs = {}
    work = tmp_path / "run"
    paths = tmp_path / "paths.yaml"
    paths.write_text(json.dumps({"results": str(work / "results"), "dataset": {"root": str(work / "phantom")}}))
    for profile in ("local", "slurm-gpu"):
        # One --configfile with both files: a second --configfile flag would replace the first.
        args = ["--configfile", TINY, paths]
        if profile == "slurm-gpu":
            args += ["--slurm-logdir", tmp_path / "slurm_logs"]
        output, wall = snakemake(args, limit=1800, profile=profile)
        work.rename(tmp_path / profile)
        runs[profile] = (tmp_path / profile / "results", output)
        print(f"{profile}: {wall:.0f} s wall, {output.count('Finished jobid')} jobs")
    return runs


def test_tiny_workflow_through_slurm_matches_local_run(slurm_cluster, tmp_path):
    """The README's command on the tiny config, with the profile's own poll settings: every job through
    sbatch, a GPU for the train jobs only (visible inside them), and the same outputs as `--profile local`."""
    runs = run_local_and_slurm(tmp_path)
    results, output = runs["slurm-gpu"]
    jobs = slurm_jobs(run_id(output))
    assert jobs and all(job.state == "COMPLETED" for job in jobs), jobs
    assert len(re.findall(r"has been submitted with SLURM jobid", output)) == len(jobs), "every job went through sbatch"
    train = {job.comment.removeprefix("rule_train_wildcards_"): job
             for job in jobs if job.comment.startswith("rule_train_")}
    gpu_trained = {model for model, job in train.items() if job.tres_per_job.startswith("gres:gpu:")}
    assert gpu_trained, f"no train job asked for a GPU: {train}"
    for model, job in train.items():
        log = results / "logs" / "train" / f"{model}.log"
        assert logged(log, "SLURM_JOB_ID") == job.id
        cuda = logged(log, "CUDA_VISIBLE_DEVICES")
        assert cuda == "0" if model in gpu_trained else cuda in (None, "", "None"), (model, cuda)
        # The fake GPU is invisible to TensorFlow: tiny.yaml's train.require_gpu: false turns the failure into
        # a warning, and the summary records the CPU the job trained on.
        warned = "require_gpu is false: training on the CPU" in log.read_text()
        assert warned == (model in gpu_trained), (model, log.read_text()[-3000:])
        device = json.loads((results / "models" / model / "train_summary.json").read_text())["device"]
        assert device["type"] == "CPU" and device["slurm_job_id"] == job.id, device
    assert all(job.tres_per_job == "N/A" for job in jobs if not job.comment.startswith("rule_train_")), jobs

    local, slurm = result_files(runs["local"][0]), result_files(results)
    assert sorted(slurm) == sorted(local)
    timed = {name for name in local if any(fnmatch(name, pattern) for pattern in TIMED_OUTPUTS)}
    differ = [name for name in sorted(set(local) - timed) if local[name].read_bytes() != slurm[name].read_bytes()]
    assert differ == [], "outputs differ between the local and the SLURM run"

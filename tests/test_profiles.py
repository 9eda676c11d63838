"""The Snakemake profiles in profiles/: found by name from the repository root, parsed the way Snakemake
parses them, and holding the settings a SLURM cluster without accounting needs. No cluster needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from snakemake.cli import get_profile_dir
from snakemake.profiles import ProfileConfigFileParser

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("slurm-gpu", "local")
FIXTURE = ROOT / "tests" / "cluster" / "fixture" / "Snakefile"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# The slurm plugin falls back to sacct when MinJobAge < 3 x the first-check delay; 300 s is SLURM's default.
DEFAULT_MIN_JOB_AGE = 300


def parse(name: str) -> dict:
    with open(ROOT / "profiles" / name / "config.yaml") as stream:
        return dict(ProfileConfigFileParser().parse(stream))


def resources(entries: list[str]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in entries)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_found_by_name_from_repository_root(name, monkeypatch):
    """`snakemake --profile <name>` from the root: Snakemake looks in the working directory first."""
    monkeypatch.chdir(ROOT)
    found = get_profile_dir(name)
    assert found is not None, f"--profile {name} does not resolve from {ROOT}: link {name} -> profiles/{name} missing"
    assert Path(found[1]).resolve() == (ROOT / "profiles" / name / "config.yaml").resolve()


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_entry_is_commented(name):
    lines = (ROOT / "profiles" / name / "config.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z][\w-]*:", line):  # a key (top level or nested); dunder keys are YTE's
            above = next(l for l in reversed(lines[:number]) if l.strip())
            # A comment right above, or the key is the first child of a commented mapping.
            parent = above.rstrip().endswith(":") and len(above) - len(above.lstrip()) < len(line) - len(line.lstrip())
            where = f"profiles/{name}/config.yaml:{number + 1}: {line.strip()!r}"
            assert above.lstrip().startswith("#") or parent, where


def test_slurm_profile_settings():
    profile = parse("slurm-gpu")
    assert profile["executor"] == "slurm"
    # Without slurmdbd the plugin's default (sacct) fails on every poll and Snakemake waits forever.
    assert profile["slurm-status-command"] == "squeue"
    assert 3 * int(profile["slurm-init-seconds-before-status-checks"]) <= DEFAULT_MIN_JOB_AGE
    assert int(profile["jobs"]) > 1 and int(profile["latency-wait"]) > 0
    defaults = resources(profile["default-resources"])
    assert "gpu" not in defaults, "GPUs are for the train jobs only (their rule declares them)"
    assert int(defaults["mem_mb"]) > 0 and int(defaults["runtime"]) > 0


def test_slurm_profile_takes_account_and_partitions_from_environment(monkeypatch):
    for variable in ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "PHYSIS_SLURM_GPU_PARTITION"):
        monkeypatch.delenv(variable, raising=False)
    unset = parse("slurm-gpu")
    # Empty = not given: the plugin then uses the cluster's default partition and account.
    assert resources(unset["default-resources"])["slurm_account"] == ""
    assert resources(unset["default-resources"])["slurm_partition"] == ""
    assert unset["set-resources"] == ["train:slurm_partition="]

    monkeypatch.setenv("SBATCH_ACCOUNT", "proj42")
    monkeypatch.setenv("SBATCH_PARTITION", "cpu")
    cpu_only = parse("slurm-gpu")
    assert resources(cpu_only["default-resources"])["slurm_account"] == "proj42"
    assert resources(cpu_only["default-resources"])["slurm_partition"] == "cpu"
    assert cpu_only["set-resources"] == ["train:slurm_partition=cpu"]

    monkeypatch.setenv("PHYSIS_SLURM_GPU_PARTITION", "gpu")
    assert parse("slurm-gpu")["set-resources"] == ["train:slurm_partition=gpu"]


def test_local_profile_runs_train_jobs_one_gpu_at_a_time():
    profile = parse("local")
    assert profile["executor"] == "local"
    assert resources(profile["resources"]) == {"gpu": "1"}


@pytest.mark.parametrize("name", PROFILES)
def test_profile_dry_run(name, tmp_path):
    """Snakemake accepts every entry (a dry run needs no cluster) and the train job asks for a GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "SNAKEMAKE_PROFILE"))}
    result = subprocess.run(
        [SNAKEMAKE, "--profile", name, "--snakefile", FIXTURE, "--directory", tmp_path, "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    train = result.stdout.split("rule train:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"resources: .*\bgpu=1\b", train), train

"""How the workflow is deployed: Snakemake alone parses it (what ``--sdm conda`` needs), another
workflow can use it as a ``module`` from its own folder, and the conda environment installs physis.

The parse imports the physis library from the checkout and reads every plugin's SPEC; only the
hooks import NumPy, pandas, TensorFlow or a cloud SDK.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "config" / "tiny.yaml"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
#: What the parse must not import: the jobs' dependencies (NumPy counts: Snakemake does not need it).
HEAVY = ("numpy", "pandas", "pyarrow", "PIL", "cv2", "tensorflow", "keras", "tf_keras", "official", "sklearn",
         "scipy", "matplotlib", "pydicom", "pycocotools", "azure", "msrest", "tqdm")


def pin(name: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(dep for dep in project["dependencies"] if dep.startswith(f"{name}=="))


def test_the_parse_imports_no_job_dependency(tmp_path):
    """A real dry run of the tiny config, watched by an import hook: no import statement in the
    Snakefile, the rule files, physis or a plugin file loads one of HEAVY while Snakemake parses."""
    code = textwrap.dedent(f"""
        import builtins, sys, traceback
        ours, heavy, seen = {str(ROOT)!r}, {HEAVY!r}, set()
        original = builtins.__import__

        def watched(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and name.split(".")[0] in heavy:
                caller = traceback.extract_stack(limit=2)[0]  # the import statement
                if caller.filename.startswith(ours) and not caller.filename.startswith(sys.prefix):
                    seen.add(f"{{name}} ({{caller.filename}}:{{caller.lineno}})")
            return original(name, globals, locals, fromlist, level)

        builtins.__import__ = watched
        from snakemake.cli import main
        try:
            main(["-n", "--quiet", "--cores", "1", "-s", {str(ROOT / "Snakefile")!r}, "--configfile", {str(TINY)!r},
                  "--config", "results=results"])
        except SystemExit as stop:
            assert not stop.code, f"the dry run failed ({{stop.code}})"
        print(sorted(seen))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", f"the parse imports job dependencies: {result.stdout}"


def test_relative_plugin_dirs_are_the_workflows_own(tmp_path, monkeypatch):
    from physis import plugins

    monkeypatch.chdir(tmp_path)  # a host workflow's folder: no plugins/ here
    assert "custom_cnn" in plugins.discover(["plugins"], use_entry_points=False)


@pytest.fixture(scope="module")
def snakemake_only(tmp_path_factory) -> Path:
    """A fresh virtual environment holding Snakemake (the pinned version) and its own dependencies."""
    venv = tmp_path_factory.mktemp("snakemake-only")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                              pin("snakemake")], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def test_snakemake_alone_parses_the_workflow(snakemake_only, tmp_path):
    """The dry run, from another folder, lists the tiny config's DAG with physis not installed."""
    python = snakemake_only / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import physis"], capture_output=True).returncode != 0
    result = subprocess.run(
        [str(snakemake_only / "bin" / "snakemake"), "-n", "--cores", "1", "-s", str(ROOT / "Snakefile"),
         "--configfile", str(TINY), "--config", f"results={tmp_path / 'results'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    listing = result.stdout + result.stderr
    for job in ("phantom", "convert", "preprocess", "train", "evaluate", "aggregate"):
        assert f"\n{job} " in listing, f"{job} missing from the dry run:\n{listing[-3000:]}"
    assert "custom_cnn" in listing and "mobilenetv2" in listing


#: A stand-in for the conda command (conda-forge cannot be reached from the test machines): Snakemake's
#: own --sdm conda code runs unchanged, but ``env create`` makes a virtual environment that borrows the
#: test's installed dependencies through a .pth line, which does not make physis importable.
CONDA = """\
#!/usr/bin/env bash
set -euo pipefail
case "$1" in
  --version) echo "conda 25.1.1" ;;
  info) echo '{{"conda_prefix": "{prefix}", "platform": "linux-64"}}' ;;
  config) echo '{{"get": {{"channel_priority": "strict"}}}}' ;;
  clean) ;;
  env)
    while [ $# -gt 0 ]; do [ "$1" = --prefix ] && env="$2"; shift; done
    {python} -m venv "$env"
    for packages in "$env"/lib/python*/site-packages; do echo "{site_packages}" > "$packages/borrowed.pth"; done ;;
  *) echo "conda stand-in: $* is not supported" >&2; exit 1 ;;
esac
"""


def test_sdm_conda_jobs_import_physis_installed_by_the_post_deploy_script(tmp_path):
    """``snakemake --sdm conda data_only`` with a conda stand-in: the environment gets physis only from
    envs/physis.post-deploy.sh, and the phantom and convert jobs run inside it."""
    import sysconfig

    shim = tmp_path / "conda"
    (shim / "bin").mkdir(parents=True)
    (shim / "bin" / "conda").write_text(CONDA.format(prefix=shim, python=sys.executable,
                                                     site_packages=sysconfig.get_paths()["purelib"]))
    (shim / "bin" / "conda").chmod(0o755)
    (shim / "bin" / "activate").write_text('source "$1/bin/activate"\n')
    work = tmp_path / "run"
    work.mkdir()
    (work / "local.yaml").write_text("dataset: {root: phantom}\n")
    result = subprocess.run(
        [str(SNAKEMAKE), "data_only", "--sdm", "conda", "--cores", "1", "-s", str(ROOT / "Snakefile"),
         "--config", "results=results", "--configfile", str(TINY), "local.yaml"],
        cwd=work, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{shim / 'bin'}:{os.environ['PATH']}"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Running post-deploy script" in result.stderr
    assert (work / "results" / "data" / "manifest.parquet").is_file()
    env = next(path for path in (work / ".snakemake" / "conda").iterdir() if path.is_dir())
    where = subprocess.run([str(env / "bin" / "python"), "-c", "import physis; print(physis.__file__)"],
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(ROOT / "workflow" / "physis" / "__init__.py")
    assert list((env / "lib").glob("python*/site-packages/__editable__.physis-*.pth"))


def test_the_post_deploy_script_needs_the_checkout_it_is_given():
    result = subprocess.run(["bash", str(ROOT / "envs" / "physis.post-deploy.sh")], capture_output=True, text=True,
                            env={key: value for key, value in os.environ.items() if key != "PHYSIS_ROOT"})
    assert result.returncode != 0 and "PHYSIS_ROOT" in result.stderr


def host_workflow(folder: Path) -> None:
    """A workflow that uses physis as a module, with the whole physis config as its own (as
    snakedeploy sets one up): the defaults plus the tiny overrides, paths relative to ``folder``."""
    tiny = yaml.safe_load(TINY.read_text())
    tiny["dataset"]["root"] = "phantom"
    from physis import config

    host_config = config.merge(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()), tiny)
    (folder / "config.yaml").write_text(yaml.safe_dump(host_config))
    (folder / "Snakefile").write_text(textwrap.dedent(f"""\
        configfile: "config.yaml"


        module physis:
            snakefile: "{ROOT / 'Snakefile'}"
            config: config


        use rule * from physis as physis_*
    """))


def test_physis_runs_as_a_module_of_another_workflow(tmp_path):
    """plugin_dirs, scripts, schemas and envs resolve against physis's folder; results and
    dataset.root against the host's working directory."""
    host_workflow(tmp_path)
    dry = subprocess.run([str(SNAKEMAKE), "-n", "--cores", "1", "physis_all"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    assert "physis_train" in dry.stdout and "physis_evaluate" in dry.stdout
    run = subprocess.run([str(SNAKEMAKE), "--cores", "1", "physis_data_only"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (tmp_path / "phantom" / "dataset.csv").is_file()
    assert (tmp_path / "results" / "data" / "manifest.parquet").is_file()
    assert (tmp_path / "results" / "logs" / "convert.log").is_file()


def test_license_and_citation_match_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (ROOT / "LICENSE").read_text().startswith(f"{project['license']['text']} License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"].startswith("physis")
    assert cff["version"] == project["version"] and cff["license"] == project["license"]["text"]
    cited = {reference["type"]: reference for reference in cff["references"]}
    assert "Epiphyseal" in cited["thesis"]["title"] and cited["thesis"]["year"] == 2021
    assert "GRAZPEDWRI-DX" in cited["article"]["title"] and cited["article"]["doi"] == "10.1038/s41597-022-01328-z"


def test_every_document_the_project_cites_is_in_the_project():
    """Code, tests and docs point at docs/*.md files that exist, never at notes outside the repository."""
    skip = {".git", ".venv", ".snakemake", "results", "resources", "build", "__pycache__", "physis.egg-info"}
    texts = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if name not in skip]
        texts += [Path(folder) / name for name in files
                  if Path(name).suffix in {".py", ".smk", ".md", ".yaml", ".yml", ".cff", ".rst"} or name == "Snakefile"]
    outside = "shared" + "/"  # split so that this file does not match itself
    for path in texts:
        text = path.read_text(errors="replace")
        assert outside + "docs" not in text, f"{path} cites notes outside the repository"
        for cited in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            assert (ROOT / cited).is_file(), f"{path} cites {cited}, which does not exist"

#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this once inside the new envs/physis.yaml environment: it installs
# physis itself, editable, from the checkout the workflow runs from. The workflow exports that
# folder as PHYSIS_ROOT while Snakemake parses it (workflow/rules/common.smk). A relative path in
# the pip section cannot do this: Snakemake creates the environment from a copy of the YAML file.
set -euo pipefail
python -m pip install --quiet --no-deps --editable "${PHYSIS_ROOT:?not set: Snakemake sets it when it parses the workflow}"

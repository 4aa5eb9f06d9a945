#!/usr/bin/env bash
# Set up ./venv from requirements.txt, then train (bash run.sh [flags]) or test (bash run.sh test [pytest args]).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x venv/bin/python ]; then
    python3 -m venv venv
fi
# Install only when requirements.txt changed since the last successful install.
if ! cmp -s requirements.txt venv/.installed-requirements.txt; then
    venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt
    cp requirements.txt venv/.installed-requirements.txt
fi

if [ "${1:-}" = "test" ]; then
    shift
    exec venv/bin/python -m pytest "$@"
fi
exec venv/bin/python mnist_recognition.py "$@"

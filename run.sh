#!/usr/bin/env bash
# Set up ./venv from requirements.txt, then train (bash run.sh [flags]) or test (bash run.sh test [pytest args]).
# PYTHON names the interpreter that makes the venv (default python3; it must be 3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x venv/bin/python ]; then
    python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        found=$("$python" --version 2>/dev/null || echo "not found")
        echo "run.sh: needs Python 3.11 or newer; $python is $found. Install one, or name it:" \
             "PYTHON=python3.12 bash run.sh" >&2
        exit 2
    fi
    "$python" -m venv venv
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

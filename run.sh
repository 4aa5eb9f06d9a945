#!/usr/bin/env bash
# Set up ./venv from requirements.txt, then train (bash run.sh [flags]); or from requirements-dev.txt too,
# then test (bash run.sh test [pytest args]) or check the format and lint (bash run.sh lint).
# PYTHON names the interpreter that makes the venv (default python3; it must be 3.11 or newer).
set -euo pipefail
cd "$(dirname "$0")"

is_3_11_or_newer() {  # is_3_11_or_newer PYTHON
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if [ ! -e venv ]; then
    python="${PYTHON:-python3}"
    if ! is_3_11_or_newer "$python"; then
        found=$("$python" --version 2>/dev/null || echo "not found")
        echo "run.sh: needs Python 3.11 or newer; $python is $found. Install one, or name it:" \
             "PYTHON=python3.12 bash run.sh" >&2
        exit 2
    fi
    # A venv made without Debian's python3-venv has a python but no pip: remove it, so that the
    # next run starts afresh instead of failing at pip.
    if ! "$python" -m venv venv; then
        rm -rf venv
        echo "run.sh: '$python -m venv venv' failed, and venv/ was removed. On Debian or Ubuntu install" \
             "the venv module first (apt-get install python3-venv), then run again." >&2
        exit 2
    fi
elif ! is_3_11_or_newer venv/bin/python; then
    found=$(venv/bin/python --version 2>/dev/null || echo "a Python that no longer runs")
    echo "run.sh: venv/ holds $found, but this program needs Python 3.11 or newer. Remove it" \
         "(rm -rf venv) and run again; PYTHON=python3.12 bash run.sh names the interpreter to use." >&2
    exit 2
fi
# The program needs requirements.txt; the tests and the lint need requirements-dev.txt too.
requirements=requirements.txt
if [ "${1:-}" = "test" ] || [ "${1:-}" = "lint" ]; then
    requirements=requirements-dev.txt
fi
# Install only when the requirements changed since the last successful install of that file.
stamp="venv/.installed-$requirements"
if ! cmp -s "$requirements" "$stamp" || ! cmp -s requirements.txt venv/.installed-requirements.txt; then
    if ! venv/bin/python -m pip --version >/dev/null 2>&1; then
        echo "run.sh: venv/ has no pip (it was made without Debian's python3-venv). Remove it (rm -rf venv)," \
             "install python3-venv (apt-get install python3-venv), and run again." >&2
        exit 2
    fi
    venv/bin/python -m pip install --disable-pip-version-check -r "$requirements"
    cp requirements.txt venv/.installed-requirements.txt
    cp "$requirements" "$stamp"
fi

if [ "${1:-}" = "test" ]; then
    shift
    exec venv/bin/python -m pytest "$@"
fi
if [ "${1:-}" = "lint" ]; then
    venv/bin/ruff check .
    exec venv/bin/ruff format --check .
fi
exec venv/bin/python mnist_recognition.py "$@"

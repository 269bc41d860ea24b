#!/usr/bin/env bash
# The mutation check: delete each named guard in turn (on a temporary copy of the repository)
# and show that a test fails for it. Run from anywhere after `make setup`:
#   bash tools/mutants.sh [--list] [guard names...]
# Exits non-zero when a guard survives or its snippet moved. tools/mutants.py has the list.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${WCMS_PYTHON:-$root/.venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "no $python: run 'make setup' first" >&2
    exit 2
fi
exec "$python" "$root/tools/mutants.py" "$@"

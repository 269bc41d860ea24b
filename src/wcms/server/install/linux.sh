#!/bin/sh
# WCMS client for Linux, served by the WCMS server at @@SERVER@@. As root:
#   curl -fsSL @@SERVER@@/install/linux.sh | sh -s -- --pin 123456
#   curl -fsSL @@SERVER@@/install/linux.sh | sh -s -- --uninstall
# Installs the wcms wheel the server serves into a venv in /opt/wcms and the systemd unit.
set -eu
SERVER='@@SERVER@@'
WHEEL='@@WHEEL@@'
PREFIX=/opt/wcms
PIN=""
UNINSTALL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --pin) PIN="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        *) echo "wcms: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then echo "wcms: run as root" >&2; exit 1; fi
if [ "$UNINSTALL" = 1 ]; then
    [ -x "$PREFIX/venv/bin/wcms" ] && "$PREFIX/venv/bin/wcms" client uninstall || true
    rm -rf "$PREFIX"
    echo "wcms: client removed"
    exit 0
fi
command -v python3 >/dev/null || { echo "wcms: python3 (3.11 or newer) is needed" >&2; exit 1; }
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade "wcms[client] @ $SERVER/install/$WHEEL"
if [ -n "$PIN" ]; then
    "$PREFIX/venv/bin/wcms" client install --server "$SERVER" --pin "$PIN"
else
    "$PREFIX/venv/bin/wcms" client install --server "$SERVER"
fi
"$PREFIX/venv/bin/wcms" client status || true

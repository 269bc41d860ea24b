#!/bin/sh
# WCMS client for Linux, served by the WCMS server at @@SERVER@@. As root:
#   curl -fsSL @@SERVER@@/install/linux.sh | sh -s -- --pin 123456
#   curl -fsSL @@SERVER@@/install/linux.sh | sh -s -- --uninstall
# Installs the wcms wheel the server serves into a venv in $WCMS_PREFIX (default /opt/wcms) and
# the systemd unit (--no-service: the venv only).
#
# Trust: the wheel is used only if its SHA-256 is the one this script holds, so the script is
# only as trustworthy as the way it arrived. It refuses a plain http:// server unless
# --allow-http (or WCMS_ALLOW_HTTP=1) says it came another trusted way (copied from the server
# itself to a place only root can write).
set -eu
SERVER='@@SERVER@@'
WHEEL='@@WHEEL@@'
WHEEL_SHA256='@@WHEEL_SHA256@@'
PREFIX=${WCMS_PREFIX:-/opt/wcms}
ALLOW_HTTP=${WCMS_ALLOW_HTTP:-0}
PIN=""
UNINSTALL=0
SERVICE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --pin) PIN="$2"; shift 2 ;;
        --uninstall) UNINSTALL=1; shift ;;
        --no-service) SERVICE=0; shift ;;
        --allow-http) ALLOW_HTTP=1; shift ;;
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
case "$SERVER" in
    https://*) ;;
    *)
        if [ "$ALLOW_HTTP" != 1 ]; then
            echo "wcms: refused: this script names $SERVER, plain http, so it may have been" >&2
            echo "  changed on its way here. Serve it over https (WCMS_PUBLIC_URL=https://... on" >&2
            echo "  the server), or copy it from the server and run the copy with --allow-http." >&2
            exit 1
        fi ;;
esac
case "$WHEEL_SHA256" in
    [0-9a-f]*) [ ${#WHEEL_SHA256} = 64 ] || WHEEL_SHA256="" ;;
    *) WHEEL_SHA256="" ;;
esac
if [ -z "$WHEEL_SHA256" ]; then
    echo "wcms: refused: this script holds no SHA-256 for $WHEEL (rebuild: wcms client bundle)" >&2
    exit 1
fi
command -v python3 >/dev/null || { echo "wcms: python3 (3.11 or newer) is needed" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "wcms: downloading $WHEEL"
python3 - "$SERVER/install/$WHEEL" "$work/$WHEEL" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as answer, open(sys.argv[2], "wb") as out:
    while chunk := answer.read(1 << 20):
        out.write(chunk)
PY
actual=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$work/$WHEEL")
if [ "$actual" != "$WHEEL_SHA256" ]; then
    echo "wcms: refused: $WHEEL has SHA-256 $actual, not $WHEEL_SHA256; nothing installed" >&2
    exit 1
fi
echo "wcms: $WHEEL matches SHA-256 $WHEEL_SHA256"
python3 -m venv "$PREFIX/venv"
# The checked local file, not the URL: pip reads what was verified above.
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade \
    "wcms[client] @ file://$work/$WHEEL"
if [ "$SERVICE" = 0 ]; then
    echo "wcms: installed in $PREFIX/venv; no service (--no-service)"
    exit 0
fi
if [ -n "$PIN" ]; then
    "$PREFIX/venv/bin/wcms" client install --server "$SERVER" --pin "$PIN"
else
    "$PREFIX/venv/bin/wcms" client install --server "$SERVER"
fi
"$PREFIX/venv/bin/wcms" client status || true

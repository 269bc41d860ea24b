"""Install routes: the one-line install scripts, the Windows bundle and the Linux wheel.

    GET /install/windows.ps1      elevated PowerShell: download, check, run the bundle's installer
    GET /install/windows.cmd      first install from cmd.exe / a Group Policy startup script
    GET /install/linux.sh         venv + checked wheel + systemd unit
    GET /install/latest.json      what installers and updaters fetch (version, sha256, key)
    GET /install/<bundle or wheel>

The files come from <data_dir>/bundles, where `wcms client bundle` writes them. The scripts are
public on purpose (like the dashboard's login page): they hold no secret, the PIN is typed on
the PC. Each holds the SHA-256 of what it downloads and checks it before anything runs; on a PC
with the client installed, the installed client checks the new bundle's signature first. The
URL they name is WCMS_PUBLIC_URL (a request's Host header only as a checked fallback).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    jsonify,
    request,
    send_from_directory,
)

bp = Blueprint("install", __name__, url_prefix="/install")

LATEST = "latest.json"
_SAFE_URL = re.compile(r"^https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~\-/]*)?$")
_SCRIPTS = {
    "windows.ps1": "text/plain; charset=utf-8",
    "windows.cmd": "text/plain; charset=utf-8",
    "linux.sh": "text/x-shellscript; charset=utf-8",
}


def register_install(app: Flask) -> None:
    """Add the /install routes to the app (create_app calls this)."""
    app.register_blueprint(bp)


def bundle_dir() -> Path:
    """<data_dir>/bundles: where `wcms client bundle` puts its output by default."""
    runtime = current_app.extensions.get("wcms")
    data_dir = Path(runtime.settings.data_dir) if runtime is not None else Path("var")
    return Path(current_app.config.get("WCMS_BUNDLE_DIR") or data_dir / "bundles")


def read_latest() -> dict[str, Any] | None:
    """latest.json of the newest bundle, or None before any was built."""
    try:
        data = json.loads((bundle_dir() / LATEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def server_url() -> str:
    """This server's base URL as the scripts name it: WCMS_PUBLIC_URL, never a request header.

    Without WCMS_PUBLIC_URL (a quick start on a lab network), the URL the script was fetched
    from, but only when the Host header is a plain host name and port: anything else is refused
    (400) with a message that names the setting, so no header text ever lands in a script.
    """
    runtime = current_app.extensions.get("wcms")
    configured = runtime.settings.public_url if runtime is not None else ""
    configured = configured or str(current_app.config.get("WCMS_PUBLIC_URL") or "")
    if configured:
        return configured.rstrip("/")
    url = request.host_url.rstrip("/")
    if not _SAFE_URL.match(url):
        abort(
            400,
            description="the Host header is not a plain host name; set WCMS_PUBLIC_URL "
            "(e.g. https://wcms.example.org) to the URL PCs reach this server at",
        )
    return url


def render_script(name: str, values: dict[str, str]) -> str:
    """Fill the @@NAME@@ placeholders of a script template."""
    text = resources.files("wcms.server").joinpath("install", name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


@bp.get("/<any('windows.ps1', 'windows.cmd', 'linux.sh'):name>")
def script(name: str) -> Response:
    latest = read_latest()
    if latest is None:
        abort(404, description="no client bundle yet: run `wcms client bundle` on the server")
    values = {
        "SERVER": server_url(),
        "BUNDLE": str(latest.get("file", "")),
        "SHA256": str(latest.get("sha256", "")),
        "PUBLIC_KEY": str(latest.get("public_key") or ""),
        "WHEEL": str(latest.get("wheel", "")),
        "WHEEL_SHA256": str(latest.get("wheel_sha256", "")),
    }
    text = render_script(name, values)
    if name.endswith(".cmd"):
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    resp = Response(text, mimetype=_SCRIPTS[name].split(";")[0])
    resp.headers["Content-Type"] = _SCRIPTS[name]
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/latest.json")
def latest() -> Response:
    data = read_latest()
    if data is None:
        abort(404, description="no client bundle yet")
    resp = jsonify(data)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/<path:name>")
def download(name: str) -> Response:
    """Only the files latest.json names: nothing else in the folder is served."""
    data = read_latest() or {}
    if name not in (data.get("file"), data.get("wheel")):
        abort(404)
    return send_from_directory(bundle_dir(), name, max_age=3600)

"""The agent fast path: the calls every PC makes all day, answered without Flask.

Heartbeats, shutdown signals and command polls are nearly all of the server's traffic, and on
one core Flask's request machinery (routing, request and response objects, contexts, hooks)
cost more than the work itself. This WSGI middleware sits in front of the Flask app and answers
the ordinary case of those three calls directly, with the same validation (the pydantic
models in schemas.py), the same authentication (auth.identify_pc), the same services and the
same answers and error shape. Anything out of the ordinary goes to Flask untouched (the body
put back), so there is still one implementation of every edge case:

- any other method or path, a body that is not `application/json` with a Content-Length within
  the limit, a body that is not a JSON object, a query with a NUL in it;
- a heartbeat that changes state (an event, the boot hardware, a PC not known to be online).

Validation and authentication failures are answered here, mapped to HTTP by the same
`errors.error_answer` Flask's handler uses. `answered` counts the requests answered here, so
tests know which path answered: tests/server/test_fastpath_generated.py sends generated
requests both ways and compares status, headers, bytes and rows written.
`WCMS_AGENT_FAST_PATH=0` turns it off.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from sqlalchemy.orm import Session

from wcms.protocol import CLIENT_PREFIX, MAX_BODY_BYTES, PcState
from wcms.server.auth import parse_bearer
from wcms.server.errors import ApiError, error_answer, unexpected_error, unreadable_body
from wcms.server.headers import security_headers
from wcms.server.runtime import Runtime
from wcms.server.schemas import (
    HeartbeatRequest,
    PollQuery,
    ShutdownRequest,
    json_object,
    parse,
    strip_bidi_json,
)
from wcms.server.services import agent
from wcms.server.services.agent import identify_pc
from wcms.server.services.errors import DomainError, Invalid

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)


def _status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase.upper()}"


_STATUS = {code: _status_line(code) for code in (200, 400, 401, 403, 500)}

Answer = tuple[int, dict[str, Any], dict[str, str]]


class _ToFlask(Exception):
    """This request is not the ordinary case: hand it to Flask."""


class _LazySession:
    """A session opened on first use (most fast-path calls need none), closed at the end."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._session: Session | None = None

    def __call__(self) -> Session:
        if self._session is None:
            self._session = self._rt.sessions()
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


class AgentFastPath:
    def __init__(self, app: WSGIApplication, rt: Runtime) -> None:
        self.app = app
        self.rt = rt
        # Requests answered here, by path: how tests know this path (not Flask) answered.
        self.answered: Counter[str] = Counter()
        # Flask's after_request hook adds the same security headers (wcms.server.create_app).
        self._headers = [("Content-Type", "application/json"), *security_headers(rt.settings)]
        # Each call's own steps are shared with its Flask view (services/agent.py).
        self._buffered = agent.buffered
        self._going_down = agent.going_down
        self._shutdown_caller = agent.shutdown_caller
        self._poll_query = PollQuery
        self._wait_for_commands = agent.wait_for_commands
        self._routes: dict[tuple[str, str], Callable[[WSGIEnvironment, _LazySession], Answer]] = {
            ("POST", CLIENT_PREFIX + "/heartbeat"): self._heartbeat,
            ("POST", CLIENT_PREFIX + "/shutdown"): self._shutdown,
            ("GET", CLIENT_PREFIX + "/commands"): self._poll,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self._routes.get((environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")))
        if route is None:
            return self.app(environ, start_response)
        db = _LazySession(self.rt)
        try:
            status, body, extra = route(environ, db)
        except _ToFlask:
            return self.app(environ, start_response)
        except (ApiError, DomainError) as err:  # mapped to HTTP as Flask maps them (errors.py)
            status, body, extra = error_answer(err)
        except Exception as exc:  # the same last resort as Flask's handler in errors.py
            status, body = unexpected_error(exc, f"agent call {environ['PATH_INFO']}")
            extra = {}
        finally:
            db.close()
        self.answered[environ["PATH_INFO"]] += 1
        # The bytes Flask's JSON provider writes (create_app's _Json): no bidi control in any
        # string (an error can echo a field's name), and jsonify's closing newline.
        data = strip_bidi_json(json.dumps(body, separators=(",", ":"))).encode() + b"\n"
        headers = [*self._headers, ("Content-Length", str(len(data))), *extra.items()]
        start_response(_STATUS.get(status) or _status_line(status), headers)
        return [data]

    # ------------------------------------------------------------------------ the three calls

    def _heartbeat(self, environ: WSGIEnvironment, db: _LazySession) -> Answer:
        hb = parse(HeartbeatRequest, _json_object(environ))
        who = identify_pc(self.rt, _token(environ), hb.machine_id)
        if not self._buffered(self.rt, who, hb):
            raise _ToFlask  # a state change: the slow path in api/client.py
        return self._answer({"state": PcState.ONLINE})

    def _shutdown(self, environ: WSGIEnvironment, db: _LazySession) -> Answer:
        req = parse(ShutdownRequest, _json_object(environ))
        # The PC's token from the cache even while the database is away (api/client.py).
        who = self._shutdown_caller(self.rt, _token(environ), req.machine_id)
        return self._answer(self._going_down(self.rt, db(), who, req.reason))

    def _poll(self, environ: WSGIEnvironment, db: _LazySession) -> Answer:
        args: dict[str, str] = {}
        for key, value in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True):
            if "\x00" in key or "\x00" in value:
                raise _ToFlask  # refused before any view, with its own message (create_app)
            args.setdefault(key, value)  # the first of repeated keys, as Flask's to_dict()
        query = parse(self._poll_query, args)
        token = _token(environ)
        who = identify_pc(self.rt, token, query.machine_id)
        found = self._wait_for_commands(self.rt, db, who, query, token)
        return self._answer({"commands": found})

    def _answer(self, body: dict[str, Any]) -> Answer:
        return 200, self.rt.agent_answer(body), {}


def _token(environ: WSGIEnvironment) -> str | None:
    return parse_bearer(environ.get("HTTP_AUTHORIZATION", ""))


def _json_object(environ: WSGIEnvironment) -> dict[str, Any]:
    """The body as a JSON object, or _ToFlask (which explains what is wrong with it)."""
    mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    length = environ.get("CONTENT_LENGTH", "")
    if mimetype != "application/json" or not length.isdigit() or int(length) > MAX_BODY_BYTES:
        raise _ToFlask
    try:
        raw = environ["wsgi.input"].read(int(length))
    except OSError as exc:  # closed mid-body, or past the body deadline (connlimits.py)
        raise unreadable_body(exc, f"agent call {environ['PATH_INFO']}") from None
    environ["wsgi.input"] = io.BytesIO(raw)  # Flask can still read it
    try:
        return json_object(raw)  # the one JSON reader (schemas.py)
    except Invalid:
        raise _ToFlask from None

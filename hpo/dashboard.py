"""optuna-dashboard on a storage, read-only unless asked otherwise.

:func:`create_app` returns optuna-dashboard's own WSGI app behind a guard that answers every request that could
write (DELETE, POST, PUT, PATCH) with ``403`` and a JSON message, unless ``allow_writes``. The read-only app also
opens its storage read-only (:func:`hpo.storage.open_read_only`: no table creation, SQLite ``mode=ro``, server
sessions in READ ONLY transactions), so the two layers hold on their own.

Every app is also behind :class:`HostGuard` (a ``Host:`` that is not this machine's loopback or an allowed name gets
``421``; proxy headers that would move links to another host are dropped) and :class:`CsvGuard` (the CSV export
never holds a cell a spreadsheet would run as a formula).

Example:
    >>> from hpo.dashboard import create_app, serve
    >>> serve(create_app("postgresql+psycopg://analyst@db/hpo"), "127.0.0.1", 8080)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from hpo.render import FORMULA_START
from hpo.storage import open_read_only, open_storage

log = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"DELETE", "POST", "PUT", "PATCH"})
READ_ONLY_MESSAGE = (
    "this dashboard is read-only: {method} {path} would change the study database; "
    "start it with `hpo dashboard --allow-writes` to enable writing"
)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class ReadOnlyGuard:
    """WSGI middleware refusing writing methods with ``403`` and ``{"reason": ..., "error": "read_only"}``."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        if method in WRITE_METHODS:
            path = str(environ.get("PATH_INFO", "/"))
            reason = READ_ONLY_MESSAGE.format(method=method, path=path)
            body = json.dumps({"reason": reason, "error": "read_only"}).encode()
            log.info("refused %s %s (read-only dashboard)", method, path)
            start_response("403 Forbidden", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)


#: The names a dashboard answers to whatever it is bound to: this machine's loopback.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


_HOST = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?$")


def host_name(header: str) -> str:
    """The host of a ``Host:`` header, lower-cased, without port or IPv6 brackets (``[::1]:8080`` -> ``::1``).

    Anything that is not exactly a host and an optional port (``[::1]evil.com``, ``a b``, ``h:p``) comes back
    whole, so it matches no allowed name."""
    h = header.strip().lower()
    m = _HOST.match(h)
    if not m:
        return h
    return m.group("v6") or m.group("name")


#: Headers a proxy sets that would make the app build links and redirects to another host: a browser page can send
#: them too, so the dashboard (which runs behind no proxy of its own) drops them.
FORWARDED_HEADERS = ("HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_PORT", "HTTP_FORWARDED",
                     "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP")  # fmt: skip


class HostGuard:
    """WSGI middleware answering ``421 Misdirected Request`` to a ``Host:`` header the dashboard is not served as.

    A web page the user visits can point its own domain at 127.0.0.1 (DNS rebinding) and read the dashboard through
    the user's browser; the browser then sends that domain as ``Host:``, which is refused here.
    """

    def __init__(self, app: WSGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed) | LOOPBACK_HOSTS

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        host = host_name(str(environ.get("HTTP_HOST") or ""))
        if host not in self.allowed:
            reason = (
                f"this dashboard is not served as host {host!r}; open it as one of "
                f"{', '.join(sorted(self.allowed))}, or start it with `hpo dashboard --allow-host NAME`"
            )
            body = json.dumps({"reason": reason, "error": "host_not_allowed"}).encode()
            log.info("refused a request for host %r", host)
            start_response(
                "421 Misdirected Request", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        for key in FORWARDED_HEADERS:
            environ.pop(key, None)
        return self.app(environ, start_response)


#: A spreadsheet runs a cell starting like a formula (hpo.render.FORMULA_START); a study's names and attributes are
#: written by whoever has the worker login, so such a cell is exported with a leading ``'``, as OWASP advises.
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?$", re.I)


def defuse_cell(cell: str) -> str:
    """``cell`` as a spreadsheet shows it, never as a formula (numbers such as ``-0.5`` stay numbers)."""
    if cell.startswith(FORMULA_START) and not _NUMBER.match(cell):
        return "'" + cell
    return cell


class CsvGuard:
    """WSGI middleware rewriting optuna-dashboard's CSV export (``/csv/...``) so no cell is a formula."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not str(environ.get("PATH_INFO", "")).startswith("/csv/"):
            return self.app(environ, start_response)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured.update(status=status, headers=headers)
            return lambda _data: None

        chunks = self.app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if captured.get("status", "").startswith("200"):
            rows = csv.reader(io.StringIO(body.decode("utf-8", "replace"), newline=""))
            out = io.StringIO(newline="")
            csv.writer(out).writerows([defuse_cell(c) for c in row] for row in rows)
            body = out.getvalue().encode()
        headers = [(k, v) for k, v in captured.get("headers", []) if k.lower() != "content-length"]
        start_response(
            captured.get("status", "500 Internal Server Error"), [*headers, ("Content-Length", str(len(body)))]
        )
        return [body]


def create_app(storage_url: str, allow_writes: bool = False, allowed_hosts: Iterable[str] = ()) -> WSGIApp:
    """optuna-dashboard's WSGI app on ``storage_url``; read-only (guarded, read-only storage) by default.

    Only requests whose ``Host:`` is a loopback name or one of ``allowed_hosts`` are answered (:class:`HostGuard`).

    Raises:
        StorageError: the storage cannot be opened.
    """
    import optuna_dashboard

    if allow_writes:
        return HostGuard(CsvGuard(optuna_dashboard.wsgi(open_storage(storage_url))), allowed_hosts)
    return HostGuard(CsvGuard(ReadOnlyGuard(optuna_dashboard.wsgi(open_read_only(storage_url)))), allowed_hosts)


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug(format, *args)


def make_dashboard_server(app: WSGIApp, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded wsgiref server (as optuna-dashboard's own CLI uses) bound to ``host:port``."""
    return make_server(host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)


def serve(app: WSGIApp, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted."""
    with make_dashboard_server(app, host, port) as httpd:
        httpd.serve_forever()

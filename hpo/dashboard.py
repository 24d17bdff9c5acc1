"""optuna-dashboard on a storage, read-only unless asked otherwise.

:func:`create_app` returns optuna-dashboard's own WSGI app behind a guard that answers every request that could
write (DELETE, POST, PUT, PATCH) with ``403`` and a JSON message, unless ``allow_writes``. The read-only app also
opens its storage read-only (:func:`hpo.storage.open_read_only`: no table creation, SQLite ``mode=ro``, server
sessions in READ ONLY transactions), so the two layers hold on their own.

Example:
    >>> from hpo.dashboard import create_app, serve
    >>> serve(create_app("postgresql+psycopg://analyst@db/hpo"), "127.0.0.1", 8080)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

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


def create_app(storage_url: str, allow_writes: bool = False) -> WSGIApp:
    """optuna-dashboard's WSGI app on ``storage_url``; read-only (guarded, read-only storage) by default.

    Raises:
        StorageError: the storage cannot be opened.
    """
    import optuna_dashboard

    if allow_writes:
        return optuna_dashboard.wsgi(open_storage(storage_url))
    return ReadOnlyGuard(optuna_dashboard.wsgi(open_read_only(storage_url)))


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

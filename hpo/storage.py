"""Storage URL -> Optuna storage. The only module that opens a database.

Choices made on purpose:

* URLs are SQLAlchemy URLs, as Optuna takes them. ``--storage`` wins, then ``HPO_STORAGE``, then the file
  ``HPO_STORAGE_FILE`` names, then the study file, then ``sqlite:///hpo.db``. A password may come from
  ``HPO_STORAGE_PASSWORD_FILE`` instead of the URL, for a URL from the user's side only (never a study file's).
* PostgreSQL connections refuse to send a password in clear text (libpq's ``require_auth=!password``) unless the
  URL sets ``require_auth`` itself: a server (or a host in the middle) that asks for one gets nothing.
* Every engine pings a pooled connection that sat idle for a second or more before using it (a connection dropped by
  a database restart is replaced, not fatal; one in steady use fails its statement, which the worker retries) and
  holds a small, bounded pool: at most :data:`POOL_SIZE` connections per process, no overflow.
* SQLite is put in WAL mode with a 60 s busy timeout, so several local processes share one file without
  ``database is locked``, and ``synchronous=NORMAL`` (the setting SQLite recommends with WAL): a commit does not
  wait for the disk, which halves what a small write costs; a crashed process loses nothing, a power cut may lose
  the last commits, never the file.
* Opening retries transient errors (refused, timed out) with exponential backoff for ``retry_for`` seconds;
  authentication failures are final at once.
* URLs are shown with the password masked, and driver messages are scrubbed of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus, unquote

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from hpo.errors import StorageError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_URL = "sqlite:///hpo.db"
#: Connections one process holds at most on a server database: Optuna's session, the heartbeat thread and the
#: budget lock each need one at the same time.
POOL_SIZE = 3
SQLITE_TIMEOUT_S = 60
#: A pooled connection idle this long is pinged before use (:func:`_ping_idle_connections`).
PING_IDLE_S = 1.0

_AUTH_MARKERS = (
    "password authentication failed",
    "access denied",
    "authentication failed",
    "no password supplied",
    "authentication method requirement",  # libpq refused what the server asked for (require_auth)
)


#: The most a URL or password file may hold (bytes): one line is read.
SECRET_FILE_MAX = 4096


def _first_line(path: str, what: str) -> str:
    """The first line of a small file the user named (``HPO_STORAGE_FILE``, ``HPO_STORAGE_PASSWORD_FILE``)."""
    try:
        with open(os.path.expanduser(path), "rb") as fh:
            data = fh.read(SECRET_FILE_MAX + 1)
        line = data[:SECRET_FILE_MAX].decode().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        raise StorageError(f"{what}: cannot read a line from {path}") from None
    if not line:
        raise StorageError(f"{what}: the first line of {path} is empty")
    return line


def resolve_url(cli_url: str | None = None, spec_url: str | None = None) -> str:
    """Pick the storage URL: CLI, then ``HPO_STORAGE``, then the first line of the file ``HPO_STORAGE_FILE`` names,
    then the study file, then the SQLite default.

    If ``HPO_STORAGE_PASSWORD_FILE`` names a file, its first line becomes the password of a URL given on the user's
    side (the first three). A study file is someone else's words: with a password file set, a URL taken from a study
    file is refused, so the password never goes to a host the study's author chose.
    """
    mine = cli_url or os.environ.get("HPO_STORAGE")
    if not mine and os.environ.get("HPO_STORAGE_FILE"):
        mine = _first_line(os.environ["HPO_STORAGE_FILE"], "HPO_STORAGE_FILE")
    url = mine or spec_url or DEFAULT_URL
    pw_file = os.environ.get("HPO_STORAGE_PASSWORD_FILE")
    if not pw_file:
        return url
    if not mine:
        if spec_url:
            raise StorageError(
                f"the storage URL {mask(spec_url)} comes from the study file and HPO_STORAGE_PASSWORD_FILE is set: "
                "the password goes only to a URL you give (--storage, HPO_STORAGE or HPO_STORAGE_FILE)"
            )
        return url  # the local SQLite default takes no password
    password = _first_line(pw_file, "HPO_STORAGE_PASSWORD_FILE")
    return _parse(url).set(password=password).render_as_string(hide_password=False)


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        if "://" not in url and ":/" not in url:  # not URL-shaped: no telling where a password is, so not shown
            raise StorageError("malformed storage URL (write dialect+driver://user@host/database)") from None
        raise StorageError(f"malformed storage URL: {mask(url)}") from None
    if parsed.host and "@" in parsed.host:  # an unescaped "@" in the password: the driver would get part of it
        raise StorageError(f"malformed storage URL: {mask(url)} (write an '@' in a password as %40)")
    return parsed


#: Query keys whose value is a credential (``?password=...``): masked as the password is.
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "sslpassword", "secret", "token", "api_key", "apikey")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:" + "|".join(SECRET_QUERY_KEYS) + r")=)([^&#;]*)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*:)(/*)(.*)$", re.S)


def _userinfo(url: str) -> tuple[str, str, str, str | None] | None:
    """Split a URL on the last ``@`` (a password may hold unescaped ``@``, ``/`` or ``:``, so no parser can be
    trusted): (scheme and slashes, user, rest after the ``@``, password or None). None without userinfo."""
    m = _SCHEME.match(url)
    if m is None:
        return None
    head, rest = m.group(1) + m.group(2), m.group(3)
    if head.lower().startswith("sqlite"):  # a file path, no credentials: an "@" in it is part of the name
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    creds, tail = rest[:at], rest[at:]
    user, sep, password = creds.partition(":")
    return head, user, tail, (password if sep else None)


def mask(url: str) -> str:
    """The URL with its password, and any credential in its query (``?password=``), replaced by ``***``.

    Works on the raw text, so malformed URLs (one slash, an unescaped ``@`` in the password, ``[bad`` hosts) are
    masked too: everything between the user's ``:`` and the last ``@`` counts as the password.
    """
    text = str(url)
    parts = _userinfo(text)
    if parts is not None:
        head, user, tail, password = parts
        if password is not None:
            text = f"{head}{user}:***{tail}"
    return _SECRET_QUERY.sub(lambda m: m.group(1) + "***", text)


def secrets_of(url: str) -> set[str]:
    """Every credential a URL holds (the password as parsed and as written, query credentials), raw and quoted."""
    found: set[str] = set()
    parts = _userinfo(str(url))
    if parts is not None and parts[3]:
        found.add(parts[3])
        found.update(p for p in parts[3].split("@") if len(p) >= 3)  # the tails a wrong parse would show
    found.update(m.group(2) for m in _SECRET_QUERY.finditer(str(url)) if m.group(2))
    try:
        parsed = make_url(url)
        if parsed.password:
            found.add(str(parsed.password))
        for key in SECRET_QUERY_KEYS:
            value = parsed.query.get(key)
            if isinstance(value, str) and value:
                found.add(value)
    except Exception:
        pass
    whole = parts[3] if parts is not None else None
    quoted = set()
    for s in found:
        quoted.update({quote_plus(s), quote(s, safe=""), unquote(s)})
    return {s for s in found | quoted if s and (len(s) >= 3 or s == whole)}  # not every "p" of a message


def scrub(text: str, url: str) -> str:
    """Remove every credential of the URL (see :func:`secrets_of`) from a message, longest first."""
    for form in sorted(secrets_of(url), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_path(url: URL) -> str | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return db


def engine_kwargs(url: str) -> dict[str, Any]:
    """Engine settings for a URL (see the module docstring)."""
    parsed = _parse(url)
    if _is_sqlite(parsed):
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    kwargs: dict[str, Any] = {
        "pool_size": POOL_SIZE,
        "max_overflow": 0,
        "pool_timeout": 60,
    }
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 5, **_pg_prepare_threshold(parsed), **_pg_require_auth(parsed)}
        if "application_name" not in parsed.query:  # one name per process: pg_stat_activity shows each worker's share
            kwargs["connect_args"]["application_name"] = f"hpo:{os.getpid()}"
    elif backend == "mysql":
        kwargs["pool_recycle"] = 3600
        kwargs["connect_args"] = {"connect_timeout": 5}
    return kwargs


def _pg_require_auth(parsed: URL) -> dict[str, Any]:
    """``require_auth=!password`` (libpq 16+): never answer a cleartext password request. A URL's own
    ``require_auth`` wins; an older libpq (no such setting) gets nothing added."""
    if "require_auth" in parsed.query or parsed.get_driver_name() != "psycopg":
        return {}
    try:
        import psycopg

        if psycopg.pq.version() < 160000:
            return {}
    except Exception:  # noqa: BLE001 - no psycopg: the driver in use says what is missing
        return {}
    return {"require_auth": "!password"}


def _pooler_check_wanted(parsed: URL) -> bool:
    """psycopg on PostgreSQL with no ``prepare_threshold`` chosen: check each connection for a pooler."""
    chosen = "prepare_threshold" in parsed.query or os.environ.get("HPO_PG_PREPARE_THRESHOLD")
    return parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg" and not chosen


_pooler_warned: set[str] = set()


def _no_prepared_statements_behind_a_proxy(parsed: URL) -> Callable[[Any, Any], None]:
    """A ``connect`` listener: when the server's own port (``inet_server_port()``) is not the port hpo connected to,
    something sits in between (PgBouncer, a proxy): prepared statements, which a transaction-pooling PgBouncer
    hands to the wrong session (``prepared statement "_pg3_0" already exists``), are turned off for the connection,
    with one warning per process naming ``?prepare_threshold=none``, which says so up front."""
    port = parsed.port or 5432

    def listener(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT inet_server_port()")
            row = cur.fetchone()
        dbapi_conn.commit()
        if row is None or row[0] is None or int(row[0]) == port:  # a Unix socket, or the server itself
            return
        dbapi_conn.prepare_threshold = None
        key = f"{parsed.host}:{port}"
        if key not in _pooler_warned:
            _pooler_warned.add(key)
            log.warning(
                "%s answers for a server on port %s: a pooler or proxy sits in between, so prepared statements are "
                "off (add ?prepare_threshold=none to the storage URL to say so and skip this check)",
                key,
                row[0],
            )

    return listener


def _pg_prepare_threshold(parsed: URL) -> dict[str, Any]:
    """``?prepare_threshold=N`` (or ``none``) on a ``postgresql+psycopg`` URL, as psycopg 3 takes it (an int or
    None; SQLAlchemy would pass the URL's text). ``none`` turns prepared statements off, as PgBouncer in
    transaction pooling mode needs; so does ``HPO_PG_PREPARE_THRESHOLD=none``."""
    raw = parsed.query.get("prepare_threshold", os.environ.get("HPO_PG_PREPARE_THRESHOLD"))
    if raw is None or parsed.get_driver_name() != "psycopg":
        return {}
    text = (raw[-1] if isinstance(raw, tuple) else raw).strip().lower()
    if text in ("none", "null", "off", ""):
        return {"prepare_threshold": None}
    try:
        return {"prepare_threshold": int(text)}
    except ValueError:
        raise StorageError(f"prepare_threshold={text!r} in the storage URL: use a number or none") from None


def _without_prepare_threshold(url: str) -> str:
    """The URL without ``prepare_threshold`` (passed as a connect argument instead, see :func:`engine_kwargs`)."""
    parsed = _parse(url)
    if "prepare_threshold" not in parsed.query:
        return url
    return parsed.difference_update_query(["prepare_threshold"]).render_as_string(hide_password=False)


def _prepare_sqlite(parsed: URL, read_only: bool) -> None:
    path = _sqlite_path(parsed)
    if path is None:
        return
    p = Path(path)
    if read_only:
        if not p.is_file():
            raise StorageError(f"no SQLite database at {p}")
        return
    if not p.parent.exists():
        raise StorageError(f"cannot create SQLite database {p}: folder {p.parent} does not exist")
    try:
        con = sqlite3.connect(str(p), timeout=SQLITE_TIMEOUT_S)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open SQLite database {p}: {exc}") from None


#: SQLSTATEs (PostgreSQL) and error numbers (MySQL/MariaDB) of a write refused by the role or a READ ONLY session.
_DENIED_SQLSTATES = {"42501", "25006"}  # insufficient_privilege, read_only_sql_transaction
_DENIED_MYSQL = {1142, 1143, 1044, 1792}  # table/column command denied, db access denied, read-only transaction


def denied_reason(exc: BaseException) -> str | None:
    """If ``exc`` (or an exception it was raised from) is the database refusing a statement to this role or to a
    READ ONLY session, the driver's one-line reason; else ``None``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        orig = getattr(e, "orig", None) or e
        code = getattr(orig, "sqlstate", None)
        args = getattr(orig, "args", ())
        if code in _DENIED_SQLSTATES or (args and isinstance(args[0], int) and args[0] in _DENIED_MYSQL):
            lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
            return lines[0] if lines else type(orig).__name__
        e = e.__cause__ or e.__context__
    return None


def describe_error(exc: BaseException, url: str) -> str:
    """A one-line, password-free reason for a database error."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    text = lines[0] if lines else type(orig).__name__
    # psycopg puts the useful part after the last "failed: "
    if "failed: " in text:
        text = text.rsplit("failed: ", 1)[-1] or text
    if re.search(r'prepared statement "[^"]*" (already|does not) exist', text):
        text += " (a transaction-pooling PgBouncer in between? add ?prepare_threshold=none to the storage URL)"
    return scrub(text, url)


def _ping_idle_connections(engine: sqlalchemy.Engine) -> None:
    """Pre-ping a pooled connection before use if it sat idle in the pool for :data:`PING_IDLE_S` or more; one that
    does not answer is replaced (the pool retries with a fresh connection), so a database restart between trials is
    not fatal. SQLAlchemy's ``pool_pre_ping`` pings at every checkout, and Optuna checks a connection out for every
    storage call, about 20 a trial: that was a round trip per call. A connection lost while in steady use fails its
    statement instead, and the worker's database retries (``hpo.worker``) run it again on a fresh one."""

    @sqlalchemy.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["hpo_idle_since"] = time.monotonic()

    @sqlalchemy.event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("hpo_idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool invalidates this connection and checks out a fresh one
            raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc


def _sqlite_synchronous_normal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _is_auth_error(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return any(m in text for m in _AUTH_MARKERS) or "(1045" in text


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
    read_only: bool = False,
    retry_for: float | None = None,
) -> optuna.storages.RDBStorage:
    """Open (and on first use create) the Optuna tables behind ``url``.

    Args:
        url: a SQLAlchemy URL.
        heartbeat_interval: seconds between heartbeats of a running trial; ``None`` turns heartbeats off.
        grace_period: seconds without a heartbeat after which a running trial counts as stale.
        max_retry: how many times a stale trial is re-queued with its parameters (Optuna's retry callback).
        read_only: never create tables; open SQLite files with ``mode=ro``.
        retry_for: seconds to keep retrying a refused or timed-out connection (default: ``$HPO_CONNECT_RETRY_FOR``,
            else 10).

    Raises:
        StorageError: malformed URL, missing driver, unreachable server, refused credentials.
    """
    parsed = _parse(url)
    if _is_sqlite(parsed):
        _prepare_sqlite(parsed, read_only)
        if read_only and _sqlite_path(parsed):
            url = f"sqlite:///file:{Path(_sqlite_path(parsed)).resolve()}?mode=ro&uri=true"
    callback = None
    if heartbeat_interval is not None:
        callback = retry_callback(max_retry)

    def make() -> optuna.storages.RDBStorage:
        with _quiet_optuna():
            storage = optuna.storages.RDBStorage(
                _without_prepare_threshold(url),
                engine_kwargs=engine_kwargs(url),
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=callback,
                skip_table_creation=read_only,
                skip_compatibility_check=read_only,
            )
        if _is_sqlite(parsed) and not read_only:
            sqlalchemy.event.listen(storage.engine, "connect", _sqlite_synchronous_normal)
            storage.engine.dispose()  # connections opened while creating the tables: reopened with the pragma
        elif not _is_sqlite(parsed):
            _ping_idle_connections(storage.engine)
            if _pooler_check_wanted(parsed):
                sqlalchemy.event.listen(storage.engine, "connect", _no_prepared_statements_behind_a_proxy(parsed))
                storage.engine.dispose()  # connections opened while creating the tables: reopened, checked
            if not read_only:
                ensure_lock_table(storage.engine)
        return storage

    return _retrying(url, retry_for, make)


def _retrying(url: str, retry_for: float | None, make: Callable[[], _T]) -> _T:
    """``make()``, retried while the database is unreachable for ``retry_for`` seconds (default:
    ``$HPO_CONNECT_RETRY_FOR``, else 10); every failure as one :class:`StorageError` line."""
    if retry_for is None:
        retry_for = float(os.environ.get("HPO_CONNECT_RETRY_FOR", "10"))
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            return make()
        except (NoSuchModuleError, ImportError) as exc:
            raise StorageError(f"no database driver for {mask(url)}: {scrub(str(exc), url)}") from None
        except (ArgumentError, ValueError) as exc:
            raise StorageError(f"malformed storage URL {mask(url)}: {scrub(str(exc), url)}") from None
        except (DBAPIError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as caught:
            # read_only skips table creation, so the first connection is made inside an Optuna session, which wraps
            # a refused password or an unreachable server in StorageInternalError: unwrap it
            exc = caught.__cause__ if isinstance(caught, optuna.exceptions.StorageInternalError) else caught
            if not isinstance(exc, DBAPIError | SQLAlchemyError):
                raise
            reason = describe_error(exc, url)
            if _is_auth_error(exc):
                raise StorageError(f"cannot connect to {mask(url)}: {reason}") from None
            if time.monotonic() + delay > deadline:
                raise StorageError(f"cannot connect to {mask(url)}: {reason}") from None
            log.warning("database %s not reachable (%s); retrying in %.1f s", mask(url), reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def rdb_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    """The RDBStorage behind a study's storage (Optuna wraps it in a cache)."""
    return getattr(storage, "_backend", storage)


def set_trial_user_attrs(
    storage: optuna.storages.BaseStorage, trial_id: int, attrs: dict[str, Any], *, replace: bool = True
) -> None:
    """Set several user attributes of a running trial in one transaction.

    Optuna's ``set_trial_user_attr`` costs three statements and a commit per key; a worker sets four keys per trial.
    Here: one insert, preceded by one delete of the same keys when ``replace`` (the trial may hold them already, as
    a re-queued copy does). The rows written are Optuna's own, so ``trial.user_attrs`` and every reader see them.
    """
    import json

    backend = rdb_backend(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return
    delete, insert = _user_attr_statements()
    with backend.engine.begin() as conn:
        if replace:
            conn.execute(delete, {"trial_id": trial_id, "keys": list(attrs)})
        conn.execute(insert, [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()])


def set_trial_attrs(trial: optuna.trial.BaseTrial, attrs: dict[str, Any], *, replace: bool = True) -> None:
    """A trial's user attributes, stored in one transaction (:func:`set_trial_user_attrs`) and kept in the trial's
    own copy (what Optuna's ``set_user_attr`` keeps current, and what the worker reads its trial from); one call per
    key for a trial that is not stored (a ``FixedTrial``)."""
    if isinstance(trial, optuna.Trial):
        set_trial_user_attrs(trial.storage, trial._trial_id, attrs, replace=replace)
        trial._cached_frozen_trial.user_attrs.update(attrs)
    else:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


@functools.cache
def _user_attr_statements() -> tuple[Any, Any]:
    from optuna.storages._rdb import models

    table = models.TrialUserAttributeModel.__table__
    keys = sqlalchemy.bindparam("keys", expanding=True)
    delete = sqlalchemy.delete(table).where(table.c.trial_id == sqlalchemy.bindparam("trial_id"), table.c.key.in_(keys))
    return delete, sqlalchemy.insert(table)


@functools.cache
def _upsert_statement(
    backend: str, table: sqlalchemy.Table, keys: tuple[str, ...], update: tuple[str, ...], now: str
) -> Any:
    """The statement :func:`_upsert` runs, built once per table and database kind. ``now``: a column set to the
    database's clock instead of a value ("" for none)."""
    fixed: dict[str, Any] = {}
    if now:
        # PostgreSQL: the clock at the statement (``now()`` is the transaction's start, which may be long before
        # when the transaction waited for the budget lock: a first heartbeat that old looks stale at birth)
        clock = {"sqlite": sqlalchemy.func.current_timestamp(), "postgresql": sqlalchemy.func.clock_timestamp()}
        fixed[now] = clock.get(backend, sqlalchemy.func.now())
    if backend == "mysql":
        from sqlalchemy.dialects.mysql import insert as my_insert

        my_stmt = my_insert(table).values(**fixed)
        return my_stmt.on_duplicate_key_update({c: fixed.get(c, my_stmt.inserted[c]) for c in update})
    if backend in ("postgresql", "sqlite"):
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as lite_insert

        ins = (pg_insert if backend == "postgresql" else lite_insert)(table).values(**fixed)
        return ins.on_conflict_do_update(
            index_elements=list(keys), set_={c: fixed.get(c, ins.excluded[c]) for c in update}
        )
    raise StorageError(f"hpo does not write to {backend} databases")


def _upsert(
    storage: optuna.storages.RDBStorage,
    table: sqlalchemy.Table,
    rows: list[dict[str, Any]],
    key: tuple[str, ...],
    update: tuple[str, ...],
    now: str = "",
    conn: sqlalchemy.Connection | None = None,
) -> None:
    """Insert ``rows``, or, where a row with the same ``key`` (a unique constraint) exists, set its ``update``
    columns to the new values; the column named ``now`` (if any) is set to the database's clock. One statement for
    all rows, in one transaction (``conn``'s, if given). Needs INSERT and UPDATE only, as Optuna's own writes."""
    stmt = _upsert_statement(storage.engine.url.get_backend_name(), table, key, update, now)
    if conn is not None:
        conn.execute(stmt, rows)
        return
    with storage.engine.begin() as own:
        own.execute(stmt, rows)


def record_heartbeat(
    storage: optuna.storages.BaseStorage, trial_ids: int | Sequence[int], conn: sqlalchemy.Connection | None = None
) -> None:
    """Optuna's ``record_heartbeat`` as one upsert, for one trial or many in one transaction (Optuna's reads the row
    first, then inserts, or re-reads it for update and writes: two to three statements a beat and trial). Same
    table, same clock (the database's). With ``conn``, inside that connection's transaction."""
    from optuna.storages._rdb import models

    ids = [trial_ids] if isinstance(trial_ids, int) else list(trial_ids)
    if not ids:
        return
    table = models.TrialHeartbeatModel.__table__  # the database's clock, as Optuna writes it (UTC text on SQLite)
    _upsert(
        rdb_backend(storage), table, [{"trial_id": i} for i in ids], ("trial_id",), ("heartbeat",), "heartbeat", conn
    )


def store_intermediate_values(storage: optuna.storages.BaseStorage, values: Sequence[tuple[int, int, float]]) -> None:
    """Store many ``(trial id, step, value)`` reports in one statement and transaction: what ``Trial.report``
    stores, one report per transaction and four statements each. A step already stored for a trial (a re-queued
    copy inherits its original's) is overwritten, as ``Trial.report`` does."""
    from optuna.storages._rdb import models

    if not values:
        return
    backend = rdb_backend(storage)
    model = models.TrialIntermediateValueModel
    rows = []
    for trial_id, step, value in values:
        stored, kind = model.intermediate_value_to_stored_repr(value)
        rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind})
    _upsert(backend, model.__table__, rows, ("trial_id", "step"), ("intermediate_value", "intermediate_value_type"))


@functools.cache
def _create_statements(dialect: str) -> tuple[Any, Any, Any]:
    """:func:`create_running_trial`'s statements, built once (they run inside the budget lock)."""
    from optuna.storages._rdb import models

    t, st = models.TrialModel.__table__, models.StudyModel.__table__
    study_id = sqlalchemy.bindparam("study_id", type_=t.c.study_id.type)
    start = sqlalchemy.bindparam("start", type_=t.c.datetime_start.type)
    lock = sqlalchemy.select(st.c.study_id).where(st.c.study_id == study_id).with_for_update()
    count = sqlalchemy.select(sqlalchemy.func.count(t.c.trial_id)).where(t.c.study_id == study_id)
    running = sqlalchemy.literal(TrialState.RUNNING, t.c.state.type)
    if dialect == "mysql":  # no RETURNING: count, then insert; the study row lock keeps the count exact
        number = sqlalchemy.bindparam("number", type_=t.c.number.type)
        insert = sqlalchemy.insert(t).values(number=number, study_id=study_id, state=running, datetime_start=start)
        return lock, count, insert
    row = sqlalchemy.select(count.scalar_subquery(), study_id, running, start)
    insert = sqlalchemy.insert(t).from_select(["number", "study_id", "state", "datetime_start"], row)
    return lock, None, insert.returning(t.c.trial_id, t.c.number)


def create_running_trial(study_id: int, conn: sqlalchemy.Connection) -> tuple[int, int, Any]:
    """Optuna's ``create_new_trial`` for a new RUNNING trial, in the caller's transaction (the budget lock's): the
    study's row locked for update, as Optuna does, so trial numbers stay unique with any other creator, then one
    insert numbering the trial by the study's trials before it. Optuna's own does this in a transaction of its own,
    four statements and a commit, which the budget lock then waited for. Returns (trial id, number, start time)."""
    import datetime

    lock, count, insert = _create_statements(conn.dialect.name)
    params: dict[str, Any] = {"study_id": study_id, "start": datetime.datetime.now()}  # Optuna's: the worker's clock
    conn.execute(lock, params)
    if count is not None:
        params["number"] = conn.execute(count, params).scalar_one()
        trial_id = conn.execute(insert, params).inserted_primary_key[0]
        return int(trial_id), int(params["number"]), params["start"]
    trial_id, number = conn.execute(insert, params).one()
    return int(trial_id), int(number), params["start"]


def unbeaten_trial_ids(storage: optuna.storages.BaseStorage, study_id: int, grace_s: float) -> list[int]:
    """Running trials that never recorded a heartbeat and started over ``grace_s`` ago: their worker died between
    taking the slot and its first beat. Optuna's stale-trial query joins on heartbeats and never sees them."""
    import datetime

    from optuna.storages._rdb import models

    t = models.TrialModel.__table__
    h = models.TrialHeartbeatModel.__table__
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace_s)  # datetime_start: the worker's clock
    stmt = sqlalchemy.select(t.c.trial_id).where(
        t.c.study_id == study_id,
        t.c.state == TrialState.RUNNING,
        t.c.datetime_start < cutoff,
        ~sqlalchemy.exists().where(h.c.trial_id == t.c.trial_id),
    )
    with rdb_backend(storage).engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(stmt)]


def retry_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-queues a failed trial's parameters, keeping its intermediate values."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with _quiet_optuna():
        return cls(max_retry=max_retry, inherit_intermediate_values=True)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence Optuna's experimental-feature warnings for the heartbeat machinery hpo uses on purpose."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


quiet_optuna = _quiet_optuna


#: The table whose rows are the studies' budget locks (one row per study, created with it). A row lock needs
#: UPDATE on this table, which only the worker role holds (``hpo db init``): the analyst role cannot even read it,
#: so no role without write privilege can stall the workers (an advisory lock or ``GET_LOCK`` needs no privilege at
#: all, and MariaDB lets a SELECT-only role lock the rows of any table it reads with ``SELECT ... FOR UPDATE``).
LOCK_TABLE = "hpo_budget_locks"
#: Longest wait for the budget lock before one attempt gives up (and is retried).
LOCK_WAIT_S = 5
#: A holder idle this long inside the lock's transaction (SIGSTOPped, its network dead) loses its connection, and
#: with it the lock; what it wrote in that transaction is rolled back, nothing else.
LOCK_IDLE_S = 10
#: Total time :func:`budget_lock` keeps retrying a lock that times out before it raises.
LOCK_RETRY_FOR_S = 600.0


@functools.cache
def lock_table() -> sqlalchemy.Table:
    """The budget locks' table: ``(study_name, n)``; ``n`` counts the times the lock was taken."""
    return sqlalchemy.Table(
        LOCK_TABLE,
        sqlalchemy.MetaData(),
        sqlalchemy.Column("study_name", sqlalchemy.String(512), primary_key=True),
        sqlalchemy.Column("n", sqlalchemy.BigInteger, nullable=False, default=0),
    )


def ensure_lock_table(engine: sqlalchemy.Engine) -> None:
    """Create the budget locks' table where it is missing (``hpo db init`` and every worker with CREATE do)."""
    if engine.url.get_backend_name() == "sqlite":
        return
    try:
        lock_table().create(engine, checkfirst=True)
    except DBAPIError as exc:
        if denied_reason(exc) is None:
            raise
        raise StorageError(
            f"table {LOCK_TABLE} is missing and this role may not create it: run hpo db init as the database's owner"
        ) from None


@functools.cache
def _lock_statement(backend: str) -> Any:
    t = lock_table()
    if backend == "mysql":
        from sqlalchemy.dialects.mysql import insert as my_insert

        ins = my_insert(t).values(study_name=sqlalchemy.bindparam("name"), n=1)
        return ins.on_duplicate_key_update(n=t.c.n + 1)
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    ins = pg_insert(t).values(study_name=sqlalchemy.bindparam("name"), n=1)
    return ins.on_conflict_do_update(index_elements=[t.c.study_name], set_={"n": t.c.n + 1})


_LOCK_SETTINGS = ("postgresql", "mysql")


@functools.cache
def _lock_settings(backend: str, wait: float, idle: float) -> tuple[str, ...]:
    """The statements that bound the budget lock's wait and its holder's idle time (:func:`budget_lock`)."""
    if backend == "postgresql":  # SET LOCAL, as one statement: for this transaction only (PgBouncer's too)
        return (
            f"SELECT set_config('lock_timeout', '{round(wait * 1000)}ms', true), "
            f"set_config('idle_in_transaction_session_timeout', '{round(idle * 1000)}ms', true)",
        )
    # MySQL/MariaDB take whole seconds; idle_transaction_timeout is MariaDB 10.3+'s (MySQL has none)
    return (
        f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(wait))}",
        f"SET SESSION idle_transaction_timeout = {max(1, math.ceil(idle))}",
    )


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a lock wait that timed out (PostgreSQL 55P03, MySQL/MariaDB 1205)."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    return getattr(orig, "sqlstate", None) == "55P03" or bool(args and args[0] == 1205)


@contextlib.contextmanager
def budget_lock(
    storage: optuna.storages.RDBStorage,
    study_name: str,
    stop: Any = None,
    wait: float = LOCK_WAIT_S,
    idle: float = LOCK_IDLE_S,
) -> Iterator[sqlalchemy.Connection | None]:
    """A lock held by one worker at a time per study, across processes and machines.

    PostgreSQL and MySQL/MariaDB: the study's row in :data:`LOCK_TABLE`, locked by an upsert in a READ COMMITTED
    transaction and released by the commit (or rollback) that ends the block. Each attempt waits at most ``wait``
    seconds (:data:`LOCK_WAIT_S`) and is retried (for :data:`LOCK_RETRY_FOR_S`, or until ``stop`` is set); a holder
    idle in the lock's transaction for ``idle`` seconds (:data:`LOCK_IDLE_S`) loses its connection and the lock
    (PostgreSQL ``idle_in_transaction_session_timeout``, MariaDB ``idle_transaction_timeout``). SQLite (one machine by nature):
    a lock file beside the database.

    Yields the connection that holds the lock (``None`` on SQLite): read the budget through it, in the transaction
    that holds the lock, so it sees every slot taken by the previous holder.
    """
    url = storage.engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_path(url)
        lock_path = f"{path}.hpo-lock" if path else None
        if lock_path is None:
            yield None
            return
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield None
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if backend not in _LOCK_SETTINGS:
        with storage.engine.connect() as conn:
            yield conn
        return
    deadline = time.monotonic() + LOCK_RETRY_FOR_S
    while True:
        conn = storage.engine.connect().execution_options(isolation_level="READ COMMITTED")
        try:
            settings = _lock_settings(backend, wait, idle)
            conn.execute(sqlalchemy.text(settings[0]))
            if backend == "mysql":
                with contextlib.suppress(DBAPIError):
                    conn.execute(sqlalchemy.text(settings[1]))
                conn.commit()  # the settings apply to the session; the lock's transaction starts now
            conn.execute(_lock_statement(backend), {"name": study_name})
        except DBAPIError as exc:
            conn.rollback()
            conn.close()
            if not is_lock_timeout(exc):
                raise
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise StorageError(f"could not take the budget lock of study {study_name!r}") from None
            log.info("budget lock of study %r busy for %g s; waiting again", study_name, wait)
            continue
        try:
            yield conn
            conn.commit()  # releases the lock
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()  # after an exception; a no-op after the commit
            conn.close()
        return


@functools.cache
def _budget_statement() -> sqlalchemy.Select[Any]:
    """:func:`budget_counts`'s statement, built once (building it cost more than running it)."""
    from optuna.storages._rdb import models

    t = models.TrialModel.__table__
    a = models.TrialSystemAttributeModel.__table__
    study_id = sqlalchemy.bindparam("study_id")

    def n(*states: TrialState) -> Any:
        return sqlalchemy.func.coalesce(sqlalchemy.func.sum(sqlalchemy.case((t.c.state.in_(states), 1), else_=0)), 0)

    c = t.alias("copies")  # not correlated with the outer query's trials
    copies = (
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(a.join(c, a.c.trial_id == c.c.trial_id))
        .where(c.c.study_id == study_id, a.c.key == "failed_trial")
        .scalar_subquery()
    )
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return sqlalchemy.select(n(*done) - copies, n(TrialState.RUNNING), n(TrialState.WAITING)).where(
        t.c.study_id == study_id
    )


def budget_counts(
    storage: optuna.storages.BaseStorage, study_id: int, conn: sqlalchemy.Connection | None = None
) -> tuple[int, int, int]:
    """(counted, running, waiting) trials of a study, in one statement.

    Counted = complete + pruned + running + failed, less one per re-queued copy: Optuna's retry callback gives each
    copy of a failed trial the system attribute ``failed_trial``, and a failed trial with a copy does not count (its
    copy does, once it runs). A waiting copy thus cancels its failed original: the slot is free until it runs.
    """
    params = {"study_id": study_id}
    if conn is not None:
        row = conn.execute(_budget_statement(), params).one()
    else:
        with rdb_backend(storage).engine.connect() as own:
            row = own.execute(_budget_statement(), params).one()
    return int(row[0]), int(row[1]), int(row[2])


#: States a trial counts against the budget in (besides a failed trial that was not re-queued).
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def requeued_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the failed trials that Optuna's retry callback re-queued (a copy lists them in ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Optuna's rule for constrained studies: a trial is feasible when every constraint it records
    (``trial.set_constraint``, or a sampler's ``constraints_func``) is <= 0; one that records none is feasible."""
    return all(c <= 0.0 for c in trial.constraints.values())


def best_of(
    trials: Sequence[optuna.trial.FrozenTrial], direction: optuna.study.StudyDirection
) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE feasible trial, as Optuna's ``study.best_trial`` picks it (None where there is none): every
    best hpo names (``hpo best``, ``hpo studies``, the progress bar, the report) honours the constraints."""
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    ok = [t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)]
    return pick(ok, key=lambda t: t.value) if ok else None  # type: ignore[arg-type,return-value]


def count_budget(trials: Sequence[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """(counted, running) of a list of trials, by the rule :func:`budget_counts` counts in SQL."""
    requeued = requeued_numbers(trials)
    counted = running = 0
    for t in trials:
        if t.state == TrialState.RUNNING:
            running += 1
        if t.state in COUNTED or (t.state == TrialState.FAIL and t.number not in requeued):
            counted += 1
    return counted, running


_READ_ONLY_SQL = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
}


#: PostgreSQL drivers that begin each transaction READ ONLY when this connection attribute is set.
_PER_TRANSACTION_READ_ONLY = {"psycopg": "read_only", "psycopg2": "readonly"}


def open_read_only(url: str, *, retry_for: float | None = None) -> optuna.storages.RDBStorage:
    """Open a storage for analysts: a query through it can never write.

    No table creation or schema check; SQLite files opened with ``mode=ro``; every PostgreSQL transaction begins
    ``READ ONLY`` (per transaction, so a transaction-pooling PgBouncer never passes it on to a worker sharing the
    login), every MySQL session is set to ``READ ONLY`` transactions (a write fails in the database even if hpo
    asked for one). Combine with a
    SELECT-only database role for a second, independent layer.

    Raises:
        StorageError: as :func:`open_storage`.
    """
    storage = open_storage(url, read_only=True, retry_for=retry_for)
    _read_only_sessions(storage.engine)
    return storage


def _read_only_sessions(engine: sqlalchemy.Engine) -> None:
    """Every later connection of ``engine`` reads only (see :func:`open_read_only`)."""
    driver = engine.url.get_driver_name()
    stmt = _READ_ONLY_SQL.get(engine.url.get_backend_name())
    if stmt is not None:

        def _read_only_session(dbapi_conn: Any, _record: Any) -> None:
            if driver in _PER_TRANSACTION_READ_ONLY:
                # every transaction begins READ ONLY (the driver sends BEGIN READ ONLY): nothing session-wide that a
                # transaction-pooling PgBouncer would hand to the next client of the same login, a worker
                setattr(dbapi_conn, _PER_TRANSACTION_READ_ONLY[driver], True)
                return
            cur = dbapi_conn.cursor()
            try:
                cur.execute(stmt)
            finally:
                cur.close()
            dbapi_conn.commit()

        sqlalchemy.event.listen(engine, "connect", _read_only_session)
        engine.dispose()  # connections opened before the listener are dropped


def read_engine(url: str, *, retry_for: float | None = None) -> sqlalchemy.Engine:
    """A bare SQLAlchemy engine for analysts' SQL on Optuna's tables, read-only as :func:`open_read_only` is (SQLite
    ``mode=ro``, READ ONLY transactions) with the same settings, retries and error lines, but without Optuna's
    ``RDBStorage`` (its schema-version bookkeeping, Alembic included, costs a few hundred ms per command).

    Raises:
        StorageError: as :func:`open_storage`.
    """
    parsed = _parse(url)
    if _is_sqlite(parsed):
        _prepare_sqlite(parsed, True)
        if _sqlite_path(parsed):
            url = f"sqlite:///file:{Path(_sqlite_path(parsed)).resolve()}?mode=ro&uri=true"

    def make() -> sqlalchemy.Engine:
        kwargs = engine_kwargs(url)
        if parsed.get_backend_name() == "mysql":
            kwargs["pool_pre_ping"] = True  # as Optuna's RDBStorage sets it
        engine = sqlalchemy.create_engine(_without_prepare_threshold(url), **kwargs)
        if not _is_sqlite(parsed):
            _ping_idle_connections(engine)
            if _pooler_check_wanted(parsed):
                sqlalchemy.event.listen(engine, "connect", _no_prepared_statements_behind_a_proxy(parsed))
        _read_only_sessions(engine)
        with engine.connect():  # the first connection: a refused login or an unreachable server fails here
            pass
        return engine

    return _retrying(url, retry_for, make)

"""Database roles for a shared study database: ``hpo db init``.

Two roles, each granted the least it needs on Optuna's tables and nothing else:

* the **worker** role (workers, ``hpo run``/``create``/``enqueue``/``reap``/``evaluate``):
  ``SELECT, INSERT, UPDATE`` on every Optuna table that Optuna writes during a study's life (studies and their
  directions and attributes, trials, params, values, intermediate values, attributes, heartbeats); ``UPDATE`` is also
  what PostgreSQL asks for the ``SELECT ... FOR UPDATE`` row locks Optuna takes on ``studies``, ``trials`` and
  ``trial_heartbeats``, and what the attribute upserts (``ON CONFLICT DO UPDATE``) need. ``DELETE`` on
  ``trial_user_attributes`` only (:func:`hpo.storage.set_trial_user_attrs` replaces a trial's keys by delete +
  insert); Optuna itself deletes rows only when a study is deleted, which a worker never does. ``SELECT`` only on
  ``version_info`` and ``alembic_version`` (the schema version, written once by ``hpo db init``). On PostgreSQL also
  ``USAGE`` on the sequences behind Optuna's serial ids (``nextval`` for INSERT), ``CONNECT`` on the database and
  ``USAGE`` on the schema. No ``CREATE``, no ``TRUNCATE``, no ``DROP``, no ``REFERENCES``, no ``TRIGGER``.
  ``SELECT, INSERT, UPDATE`` on hpo's own ``hpo_budget_locks`` (:data:`hpo.storage.LOCK_TABLE`): the studies'
  budget locks are row locks there.
* the **analyst** role (``hpo studies/trials/best/importance/check/report/dashboard``): ``SELECT`` on the same
  tables except ``hpo_budget_locks`` (nothing there: a role that can read a row can lock it on MariaDB, and a
  budget lock held by an analyst would stall every worker), ``CONNECT``/``USAGE`` on PostgreSQL, and there every session of the role starts in READ ONLY transactions
  (``ALTER ROLE ... SET default_transaction_read_only = on``). Bounded (:class:`AnalystLimits`): a connection
  limit, statement and idle-transaction timeouts, ``temp_file_limit``; no ``TEMPORARY`` (revoked from ``PUBLIC``).
  On MySQL/MariaDB the analyst reads only ``ALGORITHM=TEMPTABLE`` views in ``<database>_read``: a user who may read
  a table there may also lock its rows, which would stall the workers' trial creation.

Passwords: placeholders hpo ships and ones shorter than :data:`MIN_PASSWORD_LENGTH` are refused before anything is
sent; PostgreSQL gets the SCRAM-SHA-256 verifier computed here (:func:`scram_verifier`), never the password, so a
server log or ``pg_stat_activity`` shows none.

``hpo db init`` is idempotent: it creates the Optuna tables (through :func:`hpo.storage.open_storage`), creates
each role or updates its password, then revokes whatever the role held on those tables and grants exactly the
above, so running it again (after an Optuna schema upgrade, say) converges to the same state. MySQL/MariaDB
"roles" are users (``'name'@'%'`` by default); PostgreSQL roles are cluster-wide. SQLite has no roles: protect its
file with file permissions; analysts' commands open it with ``mode=ro``.

This module opens no database of its own: it works on the engine of the storage :func:`hpo.storage.open_storage`
opened.

Example:
    >>> from hpo.db import Role, init_roles
    >>> init_roles("postgresql+psycopg://postgres@db/hpo", Role("hpo_worker", "pw1"), Role("hpo_analyst", "pw2"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import sqlalchemy
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from hpo.errors import HpoError
from hpo.storage import LOCK_TABLE, describe_error, mask, open_storage

log = logging.getLogger(__name__)

DEFAULT_WORKER_ROLE = "hpo_worker"
DEFAULT_ANALYST_ROLE = "hpo_analyst"
_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: Tables a worker reads but never writes (the schema version, written by ``hpo db init``).
READ_ONLY_TABLES = ("version_info", "alembic_version")
#: Tables from which a worker may delete rows, and why.
DELETE_TABLES = ("trial_user_attributes",)  # hpo.storage.set_trial_user_attrs: delete + insert of a trial's keys
#: Passwords that hpo ships as placeholders (deploy/k8s/examples/secret.yaml, .env.example, the README's by-hand SQL):
#: anyone who read the repository knows them, so ``hpo db init`` refuses them (compared case-insensitively).
PLACEHOLDER_PASSWORDS = frozenset(
    {
        "replace-me-admin",
        "replace-me-worker",
        "replace-me-analyst",
        "change-me-admin",
        "change-me-worker",
        "change-me-analyst",
        "worker-password",
        "analyst-password",
    }
)
#: Shortest role password ``hpo db init`` sets.
MIN_PASSWORD_LENGTH = 8
#: PBKDF2 iterations of the SCRAM-SHA-256 verifiers (PostgreSQL's own default, ``scram_iterations``).
SCRAM_ITERATIONS = 4096
#: Suffix of the MySQL/MariaDB database whose views analysts read (``<database>_read``).
READ_DATABASE_SUFFIX = "_read"


class RoleError(HpoError):
    """Roles cannot be set up: SQLite, a bad role name, a missing password, a refused grant."""


@dataclass(frozen=True)
class Role:
    """A role to create: its name and password (``None``: keep an existing role's password)."""

    name: str
    password: str | None = None
    #: ``worker`` or ``analyst``: names the variable and option a missing password is asked for with.
    kind: str = "worker"


@dataclass(frozen=True)
class Grants:
    """What one role gets on each table (``{table: privileges}``) and on sequences (PostgreSQL); ``views_in``: the
    database of views through which it reads them instead (the MySQL/MariaDB analyst)."""

    tables: dict[str, tuple[str, ...]]
    sequences: tuple[str, ...] = ()
    views_in: str = ""


@dataclass(frozen=True)
class AnalystLimits:
    """Bounds on what the analyst role can take from the workers' server (why: issue 21, an analyst used up the
    connection slots, filled temp space, held locks).

    ``connections`` caps the role's sessions (all analysts and the dashboard together: its pool holds 3);
    ``statement_timeout_s`` and ``idle_in_transaction_s`` are the role's defaults (PostgreSQL lets a role change its
    own user-settable parameters, so they guard against accidents); ``temp_file_limit_mb`` is set by a superuser and
    the role cannot raise it. MySQL/MariaDB: ``MAX_USER_CONNECTIONS``, and on MariaDB ``MAX_STATEMENT_TIME``.
    """

    connections: int = 10
    statement_timeout_s: int = 300
    idle_in_transaction_s: int = 300
    temp_file_limit_mb: int = 1024


def optuna_tables() -> list[str]:
    """Every table Optuna's RDB storage uses, including Alembic's version table."""
    from optuna.storages._rdb import models

    return [t.name for t in models.BaseModel.metadata.sorted_tables] + ["alembic_version"]


def worker_grants(tables: list[str], sequences: tuple[str, ...] = ()) -> Grants:
    """The worker role's privileges (see the module docstring for why)."""
    grants: dict[str, tuple[str, ...]] = {}
    for t in tables:
        if t in READ_ONLY_TABLES:
            grants[t] = ("SELECT",)
        elif t in DELETE_TABLES:
            grants[t] = ("SELECT", "INSERT", "UPDATE", "DELETE")
        else:
            grants[t] = ("SELECT", "INSERT", "UPDATE")
    return Grants(grants, sequences)


def analyst_grants(tables: list[str]) -> Grants:
    """The analyst role's privileges: SELECT on every Optuna table (none on the budget locks)."""
    return Grants({t: ("SELECT",) for t in tables if t != LOCK_TABLE})


def _check_role(role: Role, admin_user: str | None) -> None:
    if not _ROLE_NAME.match(role.name):
        raise RoleError(f"role name {role.name!r}: use letters, digits and _ (at most 63), not starting with a digit")
    if admin_user and role.name == admin_user:
        raise RoleError(f"role {role.name!r} is the admin user of the storage URL; give the roles other names")
    if role.password is None:
        return
    if not role.password or any(ord(c) < 32 for c in role.password):
        raise RoleError(f"password of role {role.name!r}: empty or holds a control character")
    if role.password.lower() in PLACEHOLDER_PASSWORDS:
        raise RoleError(
            f"password of role {role.name!r} is a placeholder shipped with hpo (.env.example, deploy/k8s, README): "
            "choose your own"
        )
    if len(role.password) < MIN_PASSWORD_LENGTH:
        raise RoleError(f"password of role {role.name!r}: shorter than {MIN_PASSWORD_LENGTH} characters")


def _check_limits(limits: AnalystLimits) -> None:
    for name in ("connections", "statement_timeout_s", "idle_in_transaction_s", "temp_file_limit_mb"):
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**6:
            raise RoleError(f"analyst limit {name}: {value!r} is not a whole number from 1 to 1000000")


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep as PostgreSQL applies it to a SCRAM password (``pg_saslprep``): ASCII as is; otherwise
    non-ASCII spaces to spaces, "mapped to nothing" characters removed, NFKC; a string with prohibited, unassigned
    or badly mixed right-to-left characters is used as given, as PostgreSQL does."""
    if password.isascii():
        return password
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    out = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_a1,
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if not out or any(check(c) for c in out for check in prohibited):
        return password
    if any(stringprep.in_table_d1(c) for c in out) and (
        any(stringprep.in_table_d2(c) for c in out)
        or not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1]))
    ):
        return password
    return out


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802 / 7677), computed here so that
    ``CREATE/ALTER ROLE ... PASSWORD`` carries it, never the password: the server log, ``pg_stat_activity`` and the
    admin's own history then hold what ``pg_authid`` holds anyway.

    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64), salt 16 random bytes."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def init_roles(
    url: str, worker: Role, analyst: Role, *, mysql_host: str = "%", limits: AnalystLimits | None = None
) -> dict[str, Grants]:
    """Create Optuna's tables and the two roles on the database of ``url`` (an admin's URL), idempotently.

    Args:
        url: SQLAlchemy URL of a user who may create roles and grant on the tables (the database owner, or a
            superuser / root).
        worker: the worker role; its password is required when the role does not exist yet.
        analyst: the analyst role; likewise.
        mysql_host: the host part of the MySQL/MariaDB users (``'%'``: any host).
        limits: the analyst role's bounds (:class:`AnalystLimits`; default: its defaults).

    Returns:
        ``{role name: Grants}``, what each role now holds on Optuna's tables.

    Raises:
        RoleError: SQLite, bad role names, a missing, short or placeholder password, a refused statement.
        StorageError: the database cannot be opened.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        raise RoleError(
            "database roles do not apply to SQLite: protect the file with file permissions "
            "(workers write it; analysts' commands open it read-only with mode=ro)"
        )
    if backend not in ("postgresql", "mysql"):
        raise RoleError(f"hpo db init knows PostgreSQL and MySQL/MariaDB, not {backend}")
    if worker.name == analyst.name:
        raise RoleError("the worker and the analyst role need different names")
    for role in (worker, analyst):
        _check_role(role, parsed.username)
    if parsed.password and parsed.password.lower() in PLACEHOLDER_PASSWORDS:
        raise RoleError("the admin's password is a placeholder shipped with hpo: change it on the server first")
    limits = AnalystLimits() if limits is None else limits
    _check_limits(limits)
    read_db = (parsed.database or "") + READ_DATABASE_SUFFIX
    if backend == "mysql" and (not parsed.database or len(read_db) > 64):
        raise RoleError(
            f"the storage URL needs a database whose name leaves room for {READ_DATABASE_SUFFIX!r} (64 at most)"
        )
    passwords = [p for p in (parsed.password, worker.password, analyst.password) if p]

    storage = open_storage(url)  # creates Optuna's tables (and stamps the schema version) if they are missing
    engine = storage.engine
    try:
        with engine.begin() as conn:
            present = set(sqlalchemy.inspect(conn).get_table_names())
            tables = [t for t in [*optuna_tables(), LOCK_TABLE] if t in present]
            if backend == "postgresql":
                return _init_postgres(conn, tables, worker, analyst, limits)
            return _init_mysql(conn, tables, worker, analyst, parsed.database or "", mysql_host, limits)
    except HpoError:
        raise
    except (DBAPIError, SQLAlchemyError) as exc:
        reason = _scrub_all(describe_error(exc, url), passwords)
        raise RoleError(f"cannot set up roles in {mask(url)}: {reason}") from None
    finally:
        engine.dispose()


def _scrub_all(text: str, hidden: list[str]) -> str:
    for secret in hidden:
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            text = text.replace(form, "***")
    return text


def _literal(conn: Connection, value: str) -> str:
    """A string literal the server reads back as ``value`` (control characters were refused before).

    PostgreSQL: an ``E'...'`` string, whose escapes do not depend on ``standard_conforming_strings``. MySQL/MariaDB:
    backslashes are escapes unless the session's ``sql_mode`` has ``NO_BACKSLASH_ESCAPES``.
    """
    if conn.dialect.name == "postgresql":
        return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    mode = str(conn.execute(sqlalchemy.text("SELECT @@SESSION.sql_mode")).scalar() or "")
    if "NO_BACKSLASH_ESCAPES" not in mode.upper():
        value = value.replace("\\", "\\\\")
    return "'" + value.replace("'", "''") + "'"


def _run(conn: Connection, statement: str) -> None:
    """Run one statement through the driver's cursor without parameters, so that no ``%`` or ``:`` in a quoted
    password is read as a placeholder; inside the connection's transaction."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statement)
    except conn.dialect.loaded_dbapi.Error as exc:  # wrapped as SQLAlchemy would, minus the statement (a password)
        raise DBAPIError("(an hpo db init statement)", None, exc) from None
    finally:
        cursor.close()


def _ident(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _missing_password(role: Role) -> RoleError:
    return RoleError(
        f"role {role.name!r} does not exist yet and has no password: "
        f"set HPO_{role.kind.upper()}_PASSWORD or give --{role.kind}-password-file"
    )


def _may_set_temp_file_limit(conn: Connection) -> bool:
    """Whether this admin may give a role ``temp_file_limit`` (a superuser parameter): a superuser, or on
    PostgreSQL 15+ one granted ``SET`` on it."""
    if conn.execute(sqlalchemy.text("SELECT current_setting('is_superuser')")).scalar() == "on":
        return True
    if int(conn.execute(sqlalchemy.text("SHOW server_version_num")).scalar_one()) < 150000:
        return False
    return bool(conn.execute(sqlalchemy.text("SELECT has_parameter_privilege('temp_file_limit', 'SET')")).scalar())


def _init_postgres(
    conn: Connection, tables: list[str], worker: Role, analyst: Role, limits: AnalystLimits
) -> dict[str, Grants]:
    schema = conn.execute(sqlalchemy.text("SELECT current_schema()")).scalar_one()
    database = conn.execute(sqlalchemy.text("SELECT current_database()")).scalar_one()
    temp_file_limit = _may_set_temp_file_limit(conn)
    sequences: list[str] = []
    for t in tables:
        for col in sqlalchemy.inspect(conn).get_pk_constraint(t, schema=schema)["constrained_columns"]:
            seq = conn.execute(
                sqlalchemy.text("SELECT pg_get_serial_sequence(:t, :c)"),
                {"t": f"{_ident(conn, schema)}.{_ident(conn, t)}", "c": col},
            ).scalar()
            if seq:
                sequences.append(seq)
    q = {t: f"{_ident(conn, schema)}.{_ident(conn, t)}" for t in tables}
    result = {worker.name: worker_grants(tables, tuple(sequences)), analyst.name: analyst_grants(tables)}
    for role in (worker, analyst):
        r = _ident(conn, role.name)
        row = conn.execute(
            sqlalchemy.text("SELECT rolsuper FROM pg_roles WHERE rolname = :r"), {"r": role.name}
        ).first()
        if row is None and role.password is None:
            raise _missing_password(role)
        if row is not None and row.rolsuper:
            raise RoleError(
                f"role {role.name!r} exists and is a superuser: privileges cannot restrict it; pick another"
            )
        owned = (
            conn.execute(
                sqlalchemy.text("SELECT tablename FROM pg_tables WHERE schemaname = :s AND tableowner = :r"),
                {"s": schema, "r": role.name},
            )
            .scalars()
            .all()
        )
        if set(owned) & set(tables):
            raise RoleError(f"role {role.name!r} owns Optuna's tables: privileges cannot restrict it; pick another")
        # the verifier, never the password: statements may be logged (log_statement=ddl, a failed statement) and
        # are shown in pg_stat_activity
        pw = f" PASSWORD {_literal(conn, scram_verifier(role.password))}" if role.password is not None else ""
        limit = f" CONNECTION LIMIT {limits.connections}" if role is analyst else ""
        _run(conn, f"{'ALTER' if row is not None else 'CREATE'} ROLE {r} LOGIN{limit}{pw}")
        _run(conn, f"GRANT CONNECT ON DATABASE {_ident(conn, database)} TO {r}")
        _run(conn, f"REVOKE TEMPORARY ON DATABASE {_ident(conn, database)} FROM {r}")  # neither role needs TEMP
        _run(conn, f"GRANT USAGE ON SCHEMA {_ident(conn, schema)} TO {r}")
        _run(conn, f"REVOKE ALL ON TABLE {', '.join(q.values())} FROM {r}")
        if sequences:
            _run(conn, f"REVOKE ALL ON SEQUENCE {', '.join(sequences)} FROM {r}")
        grants = result[role.name]
        for privs in sorted(set(grants.tables.values())):
            names = ", ".join(q[t] for t, p in grants.tables.items() if p == privs)
            _run(conn, f"GRANT {', '.join(privs)} ON TABLE {names} TO {r}")
        if grants.sequences:
            _run(conn, f"GRANT USAGE ON SEQUENCE {', '.join(grants.sequences)} TO {r}")
        if role is analyst:  # a third layer: every session of the analyst starts READ ONLY; and its bounds
            _run(conn, f"ALTER ROLE {r} SET default_transaction_read_only = on")
            _run(conn, f"ALTER ROLE {r} SET statement_timeout = '{limits.statement_timeout_s}s'")
            _run(conn, f"ALTER ROLE {r} SET idle_in_transaction_session_timeout = '{limits.idle_in_transaction_s}s'")
            if temp_file_limit:
                _run(conn, f"ALTER ROLE {r} SET temp_file_limit = '{limits.temp_file_limit_mb}MB'")
            else:
                log.warning(
                    "role %s: temp_file_limit not set (a superuser parameter; this admin may not set it)", role.name
                )
        else:
            _run(conn, f"ALTER ROLE {r} RESET default_transaction_read_only")
        log.info("role %s: %s", role.name, summary(grants))
    # TEMP (temporary tables) and CREATE on the schema are PUBLIC's by default (CREATE before PostgreSQL 15): an
    # analyst who turned READ ONLY off could fill the disk with them. Nothing of hpo or Optuna creates tables.
    _run(conn, f"REVOKE TEMPORARY ON DATABASE {_ident(conn, database)} FROM PUBLIC")
    _run(conn, f"REVOKE CREATE ON SCHEMA {_ident(conn, schema)} FROM PUBLIC")
    return result


def _revoke_mysql(conn: Connection, target: str, user: str) -> None:
    try:
        _run(conn, f"REVOKE ALL PRIVILEGES ON {target} FROM {user}")
    except DBAPIError as exc:  # 1141/1147: nothing granted there yet
        if getattr(exc.orig, "args", (None,))[0] not in (1141, 1147):
            raise


def _init_mysql(
    conn: Connection,
    tables: list[str],
    worker: Role,
    analyst: Role,
    database: str,
    host: str,
    limits: AnalystLimits,
) -> dict[str, Grants]:
    """MySQL/MariaDB: a user who may SELECT a table may lock its rows (``SELECT ... FOR UPDATE`` / ``LOCK IN SHARE
    MODE``; MySQL 8.0.22+ asks more, MariaDB does not), and Optuna locks a study's row to create a trial: so the
    analyst reads nothing of the workers' tables directly, only ``ALGORITHM=TEMPTABLE`` views of them in
    ``<database>_read``, which a locking read copies without locking the rows it copied."""
    read_db = database + READ_DATABASE_SUFFIX
    views = [t for t in tables if t != LOCK_TABLE]
    mariadb = "mariadb" in str(conn.execute(sqlalchemy.text("SELECT VERSION()")).scalar()).lower()
    result = {
        worker.name: worker_grants(tables),
        analyst.name: Grants({t: ("SELECT",) for t in views}, views_in=read_db),
    }
    _run(conn, f"CREATE DATABASE IF NOT EXISTS {_ident(conn, read_db)}")
    for t in views:  # CREATE OR REPLACE: a rerun after an Optuna upgrade picks up new columns
        _run(
            conn,
            f"CREATE OR REPLACE ALGORITHM=TEMPTABLE SQL SECURITY DEFINER VIEW {_ident(conn, read_db)}.{_ident(conn, t)}"
            f" AS SELECT * FROM {_ident(conn, database)}.{_ident(conn, t)}",
        )
    for role in (worker, analyst):
        user = f"{_literal(conn, role.name)}@{_literal(conn, host)}"
        exists = conn.execute(
            sqlalchemy.text("SELECT 1 FROM mysql.user WHERE User = :u AND Host = :h"), {"u": role.name, "h": host}
        ).scalar()
        if not exists and role.password is None:
            raise _missing_password(role)
        if role.password is not None:
            pw = _literal(conn, role.password)
            _run(conn, f"CREATE USER IF NOT EXISTS {user} IDENTIFIED BY {pw}")
            _run(conn, f"ALTER USER {user} IDENTIFIED BY {pw}")
        grants = worker_grants(tables) if role is worker else Grants({})
        for t in tables:
            target = f"{_ident(conn, database)}.{_ident(conn, t)}"
            _revoke_mysql(conn, target, user)
            if t in grants.tables:
                _run(conn, f"GRANT {', '.join(grants.tables[t])} ON {target} TO {user}")
        _revoke_mysql(conn, f"{_ident(conn, read_db)}.*", user)
        if role is analyst:
            _run(conn, f"GRANT SELECT ON {_ident(conn, read_db)}.* TO {user}")
            bounds = f"MAX_USER_CONNECTIONS {limits.connections}"
            if mariadb:
                bounds += f" MAX_STATEMENT_TIME {limits.statement_timeout_s}"
            _run(conn, f"ALTER USER {user} WITH {bounds}")
        log.info("user %s@%s: %s", role.name, host, summary(result[role.name]))
    return result


def summary(grants: Grants) -> str:
    """One line: what a role holds, privileges -> number of tables."""
    by_privs: dict[tuple[str, ...], int] = {}
    for p in grants.tables.values():
        by_privs[p] = by_privs.get(p, 0) + 1
    parts = [
        f"{'/'.join(p)} on {n} table{'s' if n != 1 else ''}"
        for p, n in sorted(by_privs.items(), key=lambda kv: -len(kv[0]))
    ]
    if grants.sequences:
        parts.append(f"USAGE on {len(grants.sequences)} sequences")
    if grants.views_in:
        parts[-1:] = [f"{parts[-1] if parts else 'nothing'} through views in database {grants.views_in}"]
    return ", ".join(parts)


__all__ = [
    "DEFAULT_ANALYST_ROLE",
    "DEFAULT_WORKER_ROLE",
    "PLACEHOLDER_PASSWORDS",
    "AnalystLimits",
    "Grants",
    "Role",
    "RoleError",
    "init_roles",
    "scram_verifier",
    "summary",
]

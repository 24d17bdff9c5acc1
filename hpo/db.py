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
  (``ALTER ROLE ... SET default_transaction_read_only = on``).

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

import logging
import re
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
    """What one role gets on each table (``{table: privileges}``) and on sequences (PostgreSQL)."""

    tables: dict[str, tuple[str, ...]]
    sequences: tuple[str, ...] = ()


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
    if role.password is not None and (not role.password or any(ord(c) < 32 for c in role.password)):
        raise RoleError(f"password of role {role.name!r}: empty or holds a control character")


def init_roles(url: str, worker: Role, analyst: Role, *, mysql_host: str = "%") -> dict[str, Grants]:
    """Create Optuna's tables and the two roles on the database of ``url`` (an admin's URL), idempotently.

    Args:
        url: SQLAlchemy URL of a user who may create roles and grant on the tables (the database owner, or a
            superuser / root).
        worker: the worker role; its password is required when the role does not exist yet.
        analyst: the analyst role; likewise.
        mysql_host: the host part of the MySQL/MariaDB users (``'%'``: any host).

    Returns:
        ``{role name: Grants}``, what each role now holds on Optuna's tables.

    Raises:
        RoleError: SQLite, bad role names, a missing password for a new role, a refused statement.
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
    secrets = [p for p in (parsed.password, worker.password, analyst.password) if p]

    storage = open_storage(url)  # creates Optuna's tables (and stamps the schema version) if they are missing
    engine = storage.engine
    try:
        with engine.begin() as conn:
            present = set(sqlalchemy.inspect(conn).get_table_names())
            tables = [t for t in [*optuna_tables(), LOCK_TABLE] if t in present]
            if backend == "postgresql":
                return _init_postgres(conn, tables, worker, analyst)
            return _init_mysql(conn, tables, worker, analyst, parsed.database or "", mysql_host)
    except HpoError:
        raise
    except (DBAPIError, SQLAlchemyError) as exc:
        reason = _scrub_all(describe_error(exc, url), secrets)
        raise RoleError(f"cannot set up roles in {mask(url)}: {reason}") from None
    finally:
        engine.dispose()


def _scrub_all(text: str, secrets: list[str]) -> str:
    for secret in secrets:
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


def _init_postgres(conn: Connection, tables: list[str], worker: Role, analyst: Role) -> dict[str, Grants]:
    schema = conn.execute(sqlalchemy.text("SELECT current_schema()")).scalar_one()
    database = conn.execute(sqlalchemy.text("SELECT current_database()")).scalar_one()
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
        pw = f" PASSWORD {_literal(conn, role.password)}" if role.password is not None else ""
        _run(conn, f"{'ALTER' if row is not None else 'CREATE'} ROLE {r} LOGIN{pw}")
        _run(conn, f"GRANT CONNECT ON DATABASE {_ident(conn, database)} TO {r}")
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
        if role is analyst:  # a third layer: every session of the analyst starts READ ONLY
            _run(conn, f"ALTER ROLE {r} SET default_transaction_read_only = on")
        else:
            _run(conn, f"ALTER ROLE {r} RESET default_transaction_read_only")
        log.info("role %s: %s", role.name, summary(grants))
    return result


def _init_mysql(
    conn: Connection, tables: list[str], worker: Role, analyst: Role, database: str, host: str
) -> dict[str, Grants]:
    result = {worker.name: worker_grants(tables), analyst.name: analyst_grants(tables)}
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
        grants = result[role.name]
        for t in tables:
            target = f"{_ident(conn, database)}.{_ident(conn, t)}"
            try:
                _run(conn, f"REVOKE ALL PRIVILEGES ON {target} FROM {user}")
            except DBAPIError as exc:  # 1141/1147: nothing granted there yet
                if getattr(exc.orig, "args", (None,))[0] not in (1141, 1147):
                    raise
            if t in grants.tables:
                _run(conn, f"GRANT {', '.join(grants.tables[t])} ON {target} TO {user}")
        log.info("user %s@%s: %s", role.name, host, summary(grants))
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
    return ", ".join(parts)


__all__ = ["DEFAULT_ANALYST_ROLE", "DEFAULT_WORKER_ROLE", "Grants", "Role", "RoleError", "init_roles", "summary"]

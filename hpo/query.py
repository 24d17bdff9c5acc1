"""Programmatic queries on stored studies, for analysts; the CLI's ``studies``/``trials``/``best``/``importance``.

Everything opens the storage read-only (:func:`hpo.storage.open_read_only`) and loads no more than it must:
``studies`` reads study rows plus one ``GROUP BY`` over trials and Optuna's own best-trial query per study;
``trials(limit=N)`` picks N trial ids in SQL and loads only those through Optuna's storage API. Only
``importances`` and ``curves`` (and ``trials`` without a limit) load a whole study, as they must.

Example:
    >>> from hpo import query
    >>> df = query.trials("sqlite:///hpo.db", "spirals-optimizer", states=["COMPLETE"], limit=20)  # doctest: +SKIP
    >>> query.best("sqlite:///hpo.db", "spirals-optimizer")[0]["value"]  # doctest: +SKIP
    0.87
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError, StudyError
from hpo.storage import mask, open_read_only, quiet_optuna, read_engine

if TYPE_CHECKING:
    import pandas as pd

#: user attributes that get a column of their own in :func:`trials`.
TRIAL_ATTRS: tuple[str, ...] = ("epochs_reached", "reason", "seed", "device", "worker")
STATES: tuple[str, ...] = tuple(s.name for s in TrialState)


def _storage(url: str) -> optuna.storages.RDBStorage:
    storage = open_read_only(url)
    if not sa.inspect(storage.engine).has_table(models.StudyModel.__tablename__):
        raise StudyError(f"no Optuna studies in {mask(url)} (its tables do not exist)")
    return storage


def _study_id(storage: optuna.storages.RDBStorage, study: str, url: str) -> int:
    try:
        return storage.get_study_id_from_name(study)
    except KeyError:
        raise StudyError(f"no study named {study!r} in {mask(url)}") from None


def _engine(url: str) -> sa.Engine:
    """A read-only engine (:func:`hpo.storage.read_engine`) on a storage that holds Optuna's tables."""
    engine = read_engine(url)
    if not sa.inspect(engine).has_table(models.StudyModel.__tablename__):
        raise StudyError(f"no Optuna studies in {mask(url)} (its tables do not exist)")
    return engine


@contextlib.contextmanager
def _connected(url: str) -> Iterator[sa.Connection]:
    """One read-only connection on :func:`_engine`, the engine disposed after."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def _sid(conn: sa.Connection, study: str, url: str) -> int:
    s = models.StudyModel.__table__
    sid = conn.execute(sa.select(s.c.study_id).where(s.c.study_name == study)).scalar()
    if sid is None:
        raise StudyError(f"no study named {study!r} in {mask(url)}")
    return int(sid)


def _study_info(conn: sa.Connection, sids: Sequence[int] | None = None) -> dict[int, SimpleNamespace]:
    """Studies by id (all, or ``sids``), as SQL reads them: ``study_name``, ``directions``, ``user_attrs``,
    ``system_attrs`` (the fields :func:`hpo.progress.metric_names` reads), without any trial."""
    s, d = models.StudyModel.__table__, models.StudyDirectionModel.__table__
    u, y = models.StudyUserAttributeModel.__table__, models.StudySystemAttributeModel.__table__

    def where(stmt: Any, col: Any) -> Any:
        return stmt if sids is None else stmt.where(col.in_(list(sids)))

    info = {
        sid: SimpleNamespace(study_name=name, directions=[], user_attrs={}, system_attrs={})
        for sid, name in conn.execute(
            where(sa.select(s.c.study_id, s.c.study_name), s.c.study_id).order_by(s.c.study_id)
        )
    }
    for sid, direction in conn.execute(
        where(sa.select(d.c.study_id, d.c.direction), d.c.study_id).order_by(d.c.objective)
    ):
        if sid in info:
            info[sid].directions.append(direction)
    for table, field in ((u, "user_attrs"), (y, "system_attrs")):
        for sid, key, value in conn.execute(
            where(sa.select(table.c.study_id, table.c.key, table.c.value_json), table.c.study_id)
        ):
            if sid in info:
                getattr(info[sid], field)[key] = _attr(value)
    return info


def _metrics_of(info: SimpleNamespace) -> list[str]:
    from hpo.progress import metric_names as names_of

    return names_of(info)


def parse_states(states: Iterable[str | TrialState] | None) -> tuple[TrialState, ...] | None:
    """``["complete", "PRUNED"]`` -> TrialStates; ``None`` means all.

    Raises:
        HpoError: an unknown state name.
    """
    if states is None:
        return None
    out: list[TrialState] = []
    for s in states:
        if isinstance(s, TrialState):
            out.append(s)
            continue
        for part in str(s).split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name not in STATES:
                raise HpoError(f"unknown trial state {part.strip()!r} (known: {', '.join(STATES).lower()})")
            out.append(TrialState[name])
    return tuple(out) or None


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(sep=" ", timespec="seconds") if dt else None


def studies(storage_url: str) -> list[dict[str, Any]]:
    """Every study in a storage, without loading its trials.

    Returns:
        One dict per study: ``name``, ``direction``, ``n_trials``, one count per state (``complete``, ``pruned``,
        ``fail``, ``running``, ``waiting``), ``best_value``, ``best_trial``, ``created`` (first trial start),
        ``updated`` (last trial completion), ``metric``, ``sampler``, ``pruner``, ``budget`` (as stored by hpo),
        ``strategy`` (the ``auto`` sampler's, in words), ``checkpoint_mb`` (checkpoints held by the study's trials;
        None where none ever checkpointed).
    """
    engine = _engine(storage_url)
    t = models.TrialModel.__table__
    stmt = sa.select(
        t.c.study_id,
        t.c.state,
        sa.func.count(),
        sa.func.min(t.c.datetime_start),
        sa.func.max(t.c.datetime_complete),
    ).group_by(t.c.study_id, t.c.state)
    with engine.connect() as conn:
        frozen = _study_info(conn)
        rows = conn.execute(stmt).all()
        ckpt_bytes = _checkpoint_bytes(conn)
        counts: dict[int, dict[str, int]] = {}
        first: dict[int, datetime] = {}
        last: dict[int, datetime] = {}
        for study_id, state, n, started, completed in rows:
            name = state.name if isinstance(state, TrialState) else str(state)
            counts.setdefault(study_id, {})[name.lower()] = int(n)
            if started is not None and (study_id not in first or started < first[study_id]):
                first[study_id] = started
            if completed is not None and (study_id not in last or completed > last[study_id]):
                last[study_id] = completed
        result = []
        for sid, fs in frozen.items():
            c = counts.get(sid, {})
            best_value: float | None = None
            best_trial: int | None = None
            if len(fs.directions) == 1 and c.get("complete"):
                ranked = _ranked(conn, sid, fs.directions[0], 1)
                if ranked:
                    best_trial, best_value = ranked[0][1], ranked[0][2]
            result.append(
                {
                    "name": fs.study_name,
                    "direction": ",".join(d.name.lower() for d in fs.directions),
                    "n_trials": sum(c.values()),
                    **{s.lower(): c.get(s.lower(), 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
                    "best_value": best_value,
                    "best_trial": best_trial,
                    "created": _iso(first.get(sid)),
                    "updated": _iso(last.get(sid)),
                    "metric": cell(fs.user_attrs.get("metric")),
                    **{k: _small(fs.user_attrs.get(k)) for k in ("sampler", "pruner", "budget")},
                    "strategy": cell(fs.user_attrs.get("strategy")),  # the auto sampler's, in words
                    "checkpoint_mb": round(ckpt_bytes[sid] / 2**20, 3) if sid in ckpt_bytes else None,
                }
            )
    engine.dispose()
    return result


def _small(value: Any) -> Any:
    """A stored mapping (sampler, pruner, budget) as it is when it is small, else as bounded text (:func:`cell`)."""
    if isinstance(value, dict) and len(json.dumps(value, default=str)) <= 10 * MAX_CELL:
        return value
    return cell(value)


def _checkpoint_bytes(conn: sa.Connection) -> dict[int, int]:
    """Bytes of checkpoints held now (``hpo.objectives.checkpoints``) per study that ever checkpointed: each trial's
    ``checkpoint_bytes``, less those of failed trials whose re-queued copy took their checkpoint over."""
    t = models.TrialModel.__table__
    u, s = models.TrialUserAttributeModel.__table__, models.TrialSystemAttributeModel.__table__
    sizes_stmt = (
        sa.select(t.c.study_id, t.c.number, u.c.value_json)
        .select_from(u.join(t, u.c.trial_id == t.c.trial_id))
        .where(u.c.key == "checkpoint_bytes")
    )
    history_stmt = (
        sa.select(t.c.study_id, s.c.value_json)
        .select_from(s.join(t, s.c.trial_id == t.c.trial_id))
        .where(s.c.key == "retry_history")
    )
    taken_over = {(sid, n) for sid, value in conn.execute(history_stmt) for n in _json_list(value)}
    sizes: dict[int, int] = {}
    for study_id, number, value in conn.execute(sizes_stmt):
        held = 0 if (study_id, number) in taken_over else _json_count(value)
        sizes[study_id] = sizes.get(study_id, 0) + held
    return sizes


def _json_list(text: str) -> list[int]:
    """The whole numbers of a stored JSON list; nothing for anything else (a user objective writes any JSON)."""
    with contextlib.suppress(ValueError, TypeError):
        value = json.loads(text)
        if isinstance(value, list):
            return [n for n in value if isinstance(n, int) and not isinstance(n, bool)]
    return []


def _json_count(text: str) -> int:
    """A stored byte count; 0 for anything that is not a finite number >= 0."""
    with contextlib.suppress(ValueError, TypeError, OverflowError):
        value = json.loads(text)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**63:
            return int(value)
    return 0


def metric_names(storage: optuna.storages.BaseStorage, study_id: int) -> list[str]:
    """A stored study's metric names, one per objective (:func:`hpo.progress.metric_names`)."""
    from types import SimpleNamespace

    from hpo.progress import metric_names as names_of

    return names_of(
        SimpleNamespace(
            directions=storage.get_study_directions(study_id),
            system_attrs=storage.get_study_system_attrs(study_id),
            user_attrs=storage.get_study_user_attrs(study_id),
        )
    )


def _value_columns(metrics: Sequence[str]) -> list[str]:
    """``value`` for one objective; one column per metric name for several."""
    return list(metrics) if len(metrics) > 1 else ["value"]


#: Longest attribute text a listing shows: a user objective may store any JSON in a trial's attributes.
MAX_CELL = 200


def cell(value: Any, limit: int = MAX_CELL) -> Any:
    """A stored attribute as a listing shows it: numbers, booleans and None as they are; text, lists and mappings as
    text of at most ``limit`` characters (cut with ``...``); never an error, whatever the JSON."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trial_record(t: FrozenTrial, metrics: Sequence[str] = ()) -> dict[str, Any]:
    """One trial in the schema that ``hpo trials -f json`` and ``hpo best -f json`` share (see the README).

    Keys: ``number``, ``state``, ``value`` (a list for several objectives, None unless finished with one),
    ``params`` (name -> value), ``datetime_start``, ``datetime_complete`` (ISO 8601 or None), ``duration``
    (seconds or None), ``user_attrs`` (every user attribute: seed, device, threads, reason, ...); with several
    ``metrics`` (the study's names) also ``values``: metric name -> value (None where the trial has none).
    """
    named = {}
    if len(metrics) > 1:
        named = {"values": {m: (t.values[i] if t.values is not None else None) for i, m in enumerate(metrics)}}
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value if t.values is not None and len(t.values) == 1 else (t.values and list(t.values)),
        **named,
        "params": dict(t.params),
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        "duration": t.duration.total_seconds() if t.duration is not None else None,
        "user_attrs": dict(t.user_attrs),
    }


def param_names(storage: optuna.storages.RDBStorage | sa.Connection, study_id: int) -> list[str]:
    """Every parameter of a study, sorted: its stored study file's space and any parameter a trial has (one query).
    ``storage``: an Optuna storage or an open connection."""
    if isinstance(storage, sa.Connection):
        return _param_names(storage, study_id, _study_info(storage, [study_id])[study_id].user_attrs)
    with storage.engine.connect() as conn:
        return _param_names(conn, study_id, storage.get_study_user_attrs(study_id))


def _param_names(conn: sa.Connection, study_id: int, user_attrs: dict[str, Any]) -> list[str]:
    p, t = models.TrialParamModel.__table__, models.TrialModel.__table__
    stmt = sa.select(p.c.param_name).distinct().join(t, t.c.trial_id == p.c.trial_id).where(t.c.study_id == study_id)
    names = {r[0] for r in conn.execute(stmt)}
    stored = user_attrs.get("hpo:spec")
    if isinstance(stored, dict) and isinstance(stored.get("space"), dict):
        names |= set(stored["space"])
    return sorted(names)


def study_params(storage_url: str, study: str) -> list[str]:
    """The parameter names of a study (:func:`param_names`), sorted; for columns that do not depend on which trials
    were read.

    Raises:
        StudyError: no such study.
    """
    with _connected(storage_url) as conn:
        return param_names(conn, _sid(conn, study, storage_url))


def study_system_attrs(storage_url: str, study: str) -> dict[str, Any]:
    """A study's system attributes (e.g. the stop mark of :mod:`hpo.worker.single`), by SQL.

    Raises:
        StudyError: no such study.
    """
    return _one_study_info(storage_url, study).system_attrs


def study_metrics(storage_url: str, study: str) -> list[str]:
    """A study's metric names, one per objective (:func:`metric_names`).

    Raises:
        StudyError: no such study.
    """
    return _metrics_of(_one_study_info(storage_url, study))


def trials(
    storage_url: str,
    study: str,
    states: Iterable[str | TrialState] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Trials of a study as a DataFrame, ordered by trial number.

    Args:
        storage_url: a SQLAlchemy URL.
        study: the study name.
        states: keep only these states (names, any case; ``None``: all).
        limit: at most this many trials (the first by number); only these are loaded.

    Returns:
        Columns ``number``, ``state``, ``value`` (several objectives: one column per metric name, in the study's
        order, instead), ``params_<name>`` ... (one per parameter of the study, whatever ``limit`` and ``states``),
        ``datetime_start``, ``datetime_complete``, ``duration`` (seconds), ``epochs_reached``, ``reason``, ``seed``,
        ``device``, ``worker``.

    Raises:
        StudyError: no such study.
    """
    import pandas as pd

    names, metrics, raws = iter_trials(storage_url, study, states, limit, user_attrs=TRIAL_ATTRS)
    return pd.DataFrame([flat_row(r, names, metrics) for r in raws], columns=trial_columns(names, metrics))


def trial_columns(names: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """The columns of :func:`trials` (and ``hpo trials -f csv``), in order."""
    return [
        "number",
        "state",
        *_value_columns(metrics),
        *(f"params_{n}" for n in names),
        "datetime_start",
        "datetime_complete",
        "duration",
        *TRIAL_ATTRS,
    ]


def trial_records(
    storage_url: str,
    study: str,
    states: Iterable[str | TrialState] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Trials of a study as :func:`trial_record` dicts (``hpo trials -f json``), ordered by number.

    Raises:
        StudyError: no such study.
    """
    _, metrics, raws = iter_trials(storage_url, study, states, limit)
    return [raw_record(r, metrics) for r in raws]


def _infeasible_ids(conn: sa.Connection, sid: int) -> set[int]:
    """Ids of the study's trials that break a recorded constraint (Optuna's system attributes ``constraints``, a
    list from a sampler's ``constraints_func``, and ``constraints:NAME`` from ``trial.set_constraint``)."""
    t, a = models.TrialModel.__table__, models.TrialSystemAttributeModel.__table__
    stmt = (
        sa.select(a.c.trial_id, a.c.key, a.c.value_json)
        .join(t, t.c.trial_id == a.c.trial_id)
        .where(t.c.study_id == sid, sa.or_(a.c.key == "constraints", a.c.key.like("constraints:%")))
    )
    out: set[int] = set()
    for trial_id, key, value_json in conn.execute(stmt):
        value = json.loads(value_json)
        values = value if key == "constraints" else [value]
        if any(c > 0.0 for c in values or ()):
            out.add(trial_id)
    return out


def best(storage_url: str, study: str, n: int | None = None) -> list[dict[str, Any]]:
    """The ``n`` best COMPLETE trials (default 1), best first (empty list if none completed); a study with several
    objectives: its Pareto front (Optuna's ``study.best_trials``, every trial of it unless ``n``), sorted by the
    first metric, best first. Where trials record constraints, only feasible ones (all <= 0), as Optuna picks them.

    One objective: SQL ranks them (``ORDER BY ... LIMIT n``, as Optuna's own best-trial query orders them, ties by
    number) and reads only those trials.

    Returns:
        :func:`trial_record` dicts (``number``, ``state``, ``value``, ``params``, ``datetime_start``,
        ``datetime_complete``, ``duration``, ``user_attrs``; several objectives: ``values`` by metric name too).
    """
    return best_and_params(storage_url, study, n)[0]


def best_and_params(storage_url: str, study: str, n: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(:func:`best`, the study's parameter names (:func:`study_params`)) on one connection, for ``hpo best``."""
    if n is not None and n < 1:
        raise HpoError(f"n must be >= 1 (got {n})")
    with _connected(storage_url) as conn:
        sid = _sid(conn, study, storage_url)
        info = _study_info(conn, [sid])[sid]
        names = _param_names(conn, sid, info.user_attrs)
        if len(info.directions) == 1:
            ranked = [tid for tid, _, _ in _ranked(conn, sid, info.directions[0], 1 if n is None else n)]
            raws = {r["trial_id"]: r for r in _read_trials(conn, ranked)}
            return [raw_record(raws[tid], ()) for tid in ranked], names
    return _front(_storage(storage_url), study, sid)[:n], names


def front(study: optuna.Study) -> list[FrozenTrial]:
    """A multi-objective study's Pareto front (``study.best_trials``), sorted by the first metric, best first."""
    trials = sorted(study.best_trials, key=lambda t: (t.values[0], t.number))
    if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE:
        trials = sorted(trials, key=lambda t: (-t.values[0], t.number))
    return trials


def _front(storage: optuna.storages.RDBStorage, study: str, sid: int) -> list[dict[str, Any]]:
    with quiet_optuna():
        s = optuna.load_study(study_name=study, storage=storage)
    metrics = metric_names(storage, sid)
    return [trial_record(t, metrics) for t in front(s)]


def load_study(storage_url: str, study: str) -> optuna.Study:
    """The whole study, read-only (for reports and hypotheses).

    Raises:
        StudyError: no such study.
    """
    storage = _storage(storage_url)
    _study_id(storage, study, storage_url)
    with quiet_optuna():
        return optuna.load_study(study_name=study, storage=storage)


def importances(storage_url: str, study: str | optuna.Study, seed: int = 0, objective: int = 0) -> dict[str, float]:
    """Parameter importances (Optuna's fANOVA evaluator, seeded), most important first; with several objectives,
    for the ``objective``-th metric (default the first). A study named with over :data:`SAMPLE_SIZE` trials is
    read as :func:`sampled_study` (:func:`importances_of_sample` says which trials).

    Returns an empty dict when fewer than two trials completed or no parameter varies.
    """
    s = study if isinstance(study, optuna.Study) else sampled_study(storage_url, study)  # big: a sample
    if isinstance(s, SampledStudy) and (seed, objective) in s.importances:
        return s.importances[seed, objective]  # the report asks twice: fitted once
    complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not 0 <= objective < len(s.directions):
        return {}
    target = (lambda t: t.values[objective]) if len(s.directions) > 1 else None
    # a sample's forest is cut at depth SAMPLE_DEPTH: 4x faster on 2,000 trials, the same importances to 3 decimals
    depth = SAMPLE_DEPTH if isinstance(s, SampledStudy) else 64
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed, max_depth=depth)
        result = optuna.importance.get_param_importances(s, evaluator=evaluator, target=target)
    except (ValueError, RuntimeError):
        return {}
    found = {k: float(v) for k, v in result.items() if not math.isnan(v)}
    if isinstance(s, SampledStudy):
        s.importances[seed, objective] = found
    return found


def curves(storage_url: str, study: str | optuna.Study) -> pd.DataFrame:
    """Stored intermediate values (learning curves), long format: ``number``, ``state``, ``step``, ``value``."""
    import pandas as pd

    s = study if isinstance(study, optuna.Study) else load_study(storage_url, study)
    rows = [
        {"number": t.number, "state": t.state.name, "step": step, "value": value}
        for t in s.get_trials(deepcopy=False)
        for step, value in sorted(t.intermediate_values.items())
    ]
    return pd.DataFrame(rows, columns=["number", "state", "step", "value"])


#: trials per chunk of a streamed export (:func:`iter_trials`): a few MB held at a time, whatever the study's size.
CHUNK = 10_000


def _decoder() -> Any:
    """``(distribution_json, internal value) -> external value``, each distribution parsed once."""
    parsed: dict[str, optuna.distributions.BaseDistribution] = {}

    def external(dist_json: str, value: float) -> Any:
        dist = parsed.get(dist_json)
        if dist is None:
            dist = parsed[dist_json] = optuna.distributions.json_to_distribution(dist_json)
        return dist.to_external_repr(value)

    return external


def _attr(value_json: str) -> Any:
    """A stored attribute's JSON as its value; the text itself where it is not JSON."""
    if type(value_json) is str:  # the common shapes first (a big export reads 300,000): same values, 3x faster
        if value_json.isascii() and value_json.isdigit() and (value_json[0] != "0" or len(value_json) == 1):
            return int(value_json)
        if len(value_json) > 1 and value_json[0] == '"' == value_json[-1]:
            inner = value_json[1:-1]
            if '"' not in inner and "\\" not in inner and inner.isprintable():
                return inner
    try:
        return json.loads(value_json)
    except (TypeError, ValueError):
        return value_json  # shown as the text stored, not a traceback


def iter_trials(
    storage_url: str,
    study: str,
    states: Iterable[str | TrialState] | None = None,
    limit: int | None = None,
    user_attrs: Sequence[str] | None = None,
    chunk: int = CHUNK,
) -> tuple[list[str], list[str], Iterator[dict[str, Any]]]:
    """Stream a study's trials by SQL, ordered by number, ``chunk`` at a time (keyset pagination on the number):
    no ``FrozenTrial`` is built and memory stays bounded however many trials there are.

    Args:
        user_attrs: read only these user attributes (``None``: every one).

    Returns:
        (the study's parameter names, its metric names, an iterator of raw trials): each a dict with ``number``,
        ``state`` (name), ``values`` (list or None), ``params`` (name -> value, as Optuna gives them),
        ``datetime_start``, ``datetime_complete`` (datetimes or None), ``user_attrs``.

    Raises:
        StudyError: no such study. HpoError: a negative limit or unknown state.
    """
    if limit is not None and limit < 0:
        raise HpoError(f"limit must be >= 0 (got {limit})")
    wanted = parse_states(states)
    engine = _engine(storage_url)
    with engine.connect() as conn:
        sid = _sid(conn, study, storage_url)
        info = _study_info(conn, [sid])[sid]
        names, metrics = _param_names(conn, sid, info.user_attrs), _metrics_of(info)
    return names, metrics, _chunks(engine, sid, wanted, limit, user_attrs, chunk)


def _chunks(
    engine: sa.Engine,
    sid: int,
    wanted: tuple[TrialState, ...] | None,
    limit: int | None,
    user_attrs: Sequence[str] | None,
    chunk: int,
) -> Iterator[dict[str, Any]]:
    """Keyset pagination on ``trial_id`` (the primary key: Optuna numbers a study's trials in trial_id order, and
    ``trials`` has no index on (study_id, number)); each chunk read by :func:`_read_trials`."""
    t = models.TrialModel.__table__
    left = limit
    last = -1
    try:
        while left is None or left > 0:
            size = chunk if left is None else min(chunk, left)
            head = sa.select(t.c.trial_id).where(t.c.study_id == sid, t.c.trial_id > last)
            if wanted is not None:
                head = head.where(t.c.state.in_(list(wanted)))
            with engine.connect() as conn:
                ids = list(conn.execute(head.order_by(t.c.trial_id).limit(size)).scalars().all())
                if not ids:
                    return
                raws = _read_trials(conn, ids, user_attrs, contiguous=True)
            yield from raws
            last = ids[-1]
            if left is not None:
                left -= len(ids)
            if len(ids) < size:
                return
    finally:
        engine.dispose()


def _read_trials(
    conn: sa.Connection, ids: Sequence[int], user_attrs: Sequence[str] | None = None, contiguous: bool = False
) -> list[dict[str, Any]]:
    """The trials ``ids`` as raw dicts (:func:`iter_trials`'s, plus ``trial_id``), ordered by number: one query per
    table. ``contiguous``: ``ids`` are a sorted run of one study's ids, read as the range between the first and the
    last (an index range scan; rows of other trials in the range are dropped)."""
    if not ids:
        return []
    t, p = models.TrialModel.__table__, models.TrialParamModel.__table__
    v, u = models.TrialValueModel.__table__, models.TrialUserAttributeModel.__table__
    wanted = set(ids)

    def among(col: Any) -> Any:
        return col.between(ids[0], ids[-1]) if contiguous else col.in_(list(wanted))

    external = _decoder()
    to_value = models.TrialValueModel.stored_repr_to_value
    rows = conn.execute(
        sa.select(t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete).where(
            among(t.c.trial_id)
        )
    ).all()
    params: dict[int, dict[str, Any]] = {}
    for tid, name, value, dist in _driver_rows(
        conn,
        sa.select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json)
        .where(among(p.c.trial_id))
        .order_by(p.c.param_id),
    ):
        params.setdefault(tid, {})[name] = external(dist, value)
    values: dict[int, dict[int, float]] = {}
    kinds = models.TrialValueModel.TrialValueType
    for tid, objective, value, kind in _driver_rows(
        conn, sa.select(v.c.trial_id, v.c.objective, v.c.value, v.c.value_type).where(among(v.c.trial_id))
    ):
        values.setdefault(tid, {})[objective] = to_value(value, kinds[kind] if isinstance(kind, str) else kind)
    attrs_stmt = sa.select(u.c.trial_id, u.c.key, u.c.value_json).where(among(u.c.trial_id))
    if user_attrs is not None:
        attrs_stmt = attrs_stmt.where(u.c.key.in_(list(user_attrs)))
    attrs: dict[int, dict[str, Any]] = {}
    for tid, key, value_json in _driver_rows(conn, attrs_stmt.order_by(u.c.trial_user_attribute_id)):
        attrs.setdefault(tid, {})[key] = _attr(value_json)
    out = []
    for tid, number, state, start, done in sorted(rows, key=lambda r: r[1]):
        if tid not in wanted:
            continue
        vals = values.get(tid)
        out.append(
            {
                "trial_id": tid,
                "number": number,
                "state": state.name if isinstance(state, TrialState) else str(state),
                "values": (list(vals.values()) if len(vals) == 1 else [vals[k] for k in sorted(vals)])
                if vals
                else None,
                "params": params.get(tid, {}),
                "datetime_start": start,
                "datetime_complete": done,
                "user_attrs": attrs.get(tid, {}),
            }
        )
    return out


def _driver_rows(conn: sa.Connection, stmt: Any) -> list[Any]:
    """A statement's rows as the database driver returns them, without SQLAlchemy's per-row ``Row`` and type
    processing (half the CPU of a big export): only for columns of numbers and text, whose driver values are the
    Python values (an Enum column comes back as its name)."""
    result = conn.execute(stmt)
    try:
        return list(result.cursor.fetchall()) if result.cursor is not None else []
    finally:
        result.close()


def flat_row(raw: dict[str, Any], names: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
    """A streamed trial (:func:`iter_trials`) as a row of :func:`trials`' columns (``hpo trials -f csv``)."""
    vals = raw["values"]
    row: dict[str, Any] = {"number": raw["number"], "state": raw["state"]}
    if len(metrics) > 1:
        row.update((m, vals[i] if vals is not None and i < len(vals) else None) for i, m in enumerate(metrics))
    else:
        row["value"] = vals[0] if vals is not None and len(vals) == 1 else vals
    params = raw["params"]
    for n in names:
        row[f"params_{n}"] = params.get(n)
    start, done = raw["datetime_start"], raw["datetime_complete"]
    row["datetime_start"], row["datetime_complete"] = start, done
    row["duration"] = (done - start).total_seconds() if start is not None and done is not None else None
    attrs = raw["user_attrs"]
    for k in TRIAL_ATTRS:
        row[k] = cell(attrs.get(k))  # any JSON a user objective stored: bounded text, as trials() shows it
    return row


def raw_record(raw: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """A streamed trial (:func:`iter_trials`) in :func:`trial_record`'s schema (``hpo trials -f json``)."""
    vals = raw["values"]
    named = {}
    if len(metrics) > 1:
        named = {"values": {m: (vals[i] if vals is not None else None) for i, m in enumerate(metrics)}}
    start, done = raw["datetime_start"], raw["datetime_complete"]
    return {
        "number": raw["number"],
        "state": raw["state"],
        "value": vals[0] if vals is not None and len(vals) == 1 else (vals and list(vals)),
        **named,
        "params": raw["params"],
        "datetime_start": start.isoformat() if start else None,
        "datetime_complete": done.isoformat() if done else None,
        "duration": (done - start).total_seconds() if start is not None and done is not None else None,
        "user_attrs": raw["user_attrs"],
    }


#: a study with more trials than this is read as a sample (:func:`sampled_study`) by ``importance`` and ``report``.
SAMPLE_SIZE = 2_000
#: of which the best complete trials, by the first metric (the rest drawn uniformly at random, seeded).
SAMPLE_TOP = 200
#: depth of fANOVA's trees on a sample (Optuna's default 64 grows them until every leaf is one trial)
SAMPLE_DEPTH = 10


@dataclass(frozen=True)
class Sample:
    """Which trials a sampled read holds, and the study's true counts (by SQL), for the report to state."""

    counts: dict[str, int]  # every trial of the study, by state name
    used: int
    top: int
    drawn: int
    seed: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, what: str = "figures, importances and verdicts") -> str:
        """``importances from 2,000 of 100,000 trials: the best 200 complete and 1,800 drawn at random, seed 0``."""
        return (
            f"{what} from {self.used:,} of {self.total:,} trials: the best {self.top:,} complete trials and "
            f"{self.drawn:,} drawn uniformly at random from the rest (seed {self.seed}); fANOVA trees of depth"
            f" <= {SAMPLE_DEPTH}"
        )


class SampledStudy(optuna.Study):
    """A stored study whose trials are a sample (``sample`` says which); everything else reads the storage."""

    def __init__(self, study_name: str, storage: optuna.storages.RDBStorage, trials: list[FrozenTrial], sample: Sample):
        with quiet_optuna():
            super().__init__(study_name=study_name, storage=storage)
        self._sample_trials = trials
        self.sample = sample
        self.importances: dict[tuple[int, int], dict[str, float]] = {}

    @property
    def trials(self) -> list[FrozenTrial]:
        return list(self._sample_trials)

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._sample_trials if states is None or t.state in states]

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        return self.get_trials(deepcopy, states)


def sampled_study(
    storage_url: str, study: str, size: int = SAMPLE_SIZE, top: int = SAMPLE_TOP, seed: int = 0
) -> optuna.Study:
    """The whole study when it has at most ``size`` trials; beyond, a :class:`SampledStudy` of ``size``: the ``top``
    best complete trials (first metric, finite values, by SQL ``ORDER BY ... LIMIT``) and the rest drawn uniformly
    at random from every other trial (``random.Random(seed)``), so memory and time stay bounded.

    Raises:
        StudyError: no such study.
    """
    storage = _storage(storage_url)
    sid = _study_id(storage, study, storage_url)
    t, v = models.TrialModel.__table__, models.TrialValueModel.__table__
    with storage.engine.connect() as conn:
        counts = {
            (s.name if isinstance(s, TrialState) else str(s)): int(n)
            for s, n in conn.execute(
                sa.select(t.c.state, sa.func.count()).where(t.c.study_id == sid).group_by(t.c.state)
            )
        }
        if sum(counts.values()) <= size:
            return load_study(storage_url, study)
        maximize = storage.get_study_directions(sid)[0] == optuna.study.StudyDirection.MAXIMIZE
        best = [
            r[0]
            for r in conn.execute(
                sa.select(t.c.trial_id)
                .join(v, v.c.trial_id == t.c.trial_id)
                .where(
                    t.c.study_id == sid,
                    t.c.state == TrialState.COMPLETE,
                    v.c.objective == 0,
                    v.c.value_type == models.TrialValueModel.TrialValueType.FINITE,
                )
                .order_by(v.c.value.desc() if maximize else v.c.value.asc(), t.c.trial_id)
                .limit(top)
            )
        ]
        chosen = set(best)
        rest = [r[0] for r in conn.execute(sa.select(t.c.trial_id).where(t.c.study_id == sid).order_by(t.c.trial_id))]
    drawn = random.Random(seed).sample([i for i in rest if i not in chosen], size - len(best))
    ids = chosen | set(drawn)
    with quiet_optuna():
        frozen = [x for x in storage._get_trials(sid, None, ids, max(ids)) if x._trial_id in ids]
    sample = Sample(counts=counts, used=len(frozen), top=len(best), drawn=len(drawn), seed=seed)
    return SampledStudy(study, storage, sorted(frozen, key=lambda x: x.number), sample)


def importances_of_sample(storage_url: str, study: str, seed: int = 0) -> tuple[dict[str, float], Sample | None]:
    """:func:`importances` and the sample they were fitted on (None: every trial), for ``hpo importance``."""
    s = sampled_study(storage_url, study, seed=seed)
    return importances(storage_url, s, seed=seed), getattr(s, "sample", None)


def _ranked(
    conn: sa.Connection, sid: int, direction: optuna.study.StudyDirection, n: int
) -> list[tuple[int, int, float]]:
    """``(trial_id, number, value)`` of the ``n`` best feasible COMPLETE trials, ranked by SQL as Optuna's best-trial
    query ranks them (infinities by their stored type), ties by number; trials that break a recorded constraint are
    skipped, as Optuna's ``study.best_trial`` skips them."""
    t, v = models.TrialModel.__table__, models.TrialValueModel.__table__
    kind = models.TrialValueModel.TrialValueType
    maximize = direction == optuna.study.StudyDirection.MAXIMIZE
    first, last = (kind.INF_POS, kind.INF_NEG) if maximize else (kind.INF_NEG, kind.INF_POS)
    rank = sa.case((v.c.value_type == first, 0), (v.c.value_type == last, 2), else_=1)
    infeasible = _infeasible_ids(conn, sid)
    stmt = (
        sa.select(t.c.trial_id, t.c.number, v.c.value, v.c.value_type)
        .join(v, v.c.trial_id == t.c.trial_id)
        .where(t.c.study_id == sid, t.c.state == TrialState.COMPLETE, v.c.objective == 0)
        .order_by(rank, v.c.value.desc() if maximize else v.c.value.asc(), t.c.number)
        .limit(n + len(infeasible))
    )
    to_value = models.TrialValueModel.stored_repr_to_value
    rows = [(tid, num, to_value(value, vt)) for tid, num, value, vt in conn.execute(stmt) if tid not in infeasible]
    return rows[:n]


class TrialsView:
    """A study as :mod:`hpo.hypotheses` reads it: ``user_attrs``, ``direction``, ``get_trials`` over light COMPLETE
    trials (``number``, ``value``, ``params`` and ``distributions`` of the asked parameters, ``user_attrs`` with
    ``sweeps`` only), and which trials they are (``total`` complete ones, ``used`` read, ``seed``)."""

    def __init__(self, user_attrs: dict[str, Any], direction: Any, trials: list[Any], total: int, seed: int) -> None:
        self.user_attrs, self.direction, self._trials = user_attrs, direction, trials
        self.total, self.used, self.seed = total, len(trials), seed

    def get_trials(self, deepcopy: bool = False, states: Container[TrialState] | None = None) -> list[Any]:
        return list(self._trials)

    @property
    def sampled(self) -> bool:
        return self.used < self.total


def _one_study_info(storage_url: str, study: str) -> SimpleNamespace:
    """One study's :func:`_study_info` on a connection of its own."""
    with _connected(storage_url) as conn:
        sid = _sid(conn, study, storage_url)
        return _study_info(conn, [sid])[sid]


def study_user_attrs(storage_url: str, study: str) -> dict[str, Any]:
    """A study's user attributes (its stored study file among them), by SQL.

    Raises:
        StudyError: no such study.
    """
    return _one_study_info(storage_url, study).user_attrs


def complete_trials(
    storage_url: str, study: str, params: Sequence[str], size: int = SAMPLE_SIZE, seed: int = 0
) -> TrialsView:
    """The COMPLETE trials with a finite first value that predictions are checked on, by SQL, reading only the
    parameters ``params`` and the ``sweeps`` attribute: every such trial up to ``size``; beyond, every trial of a
    design sweep and a uniform random sample (``random.Random(seed)``) of the others, ``size`` in all (a uniform
    sample: correlations and group means as on every trial, within the bootstrap's intervals).

    Raises:
        StudyError: no such study.
    """
    t, v = models.TrialModel.__table__, models.TrialValueModel.__table__
    p, u = models.TrialParamModel.__table__, models.TrialUserAttributeModel.__table__
    with _connected(storage_url) as conn:
        sid = _sid(conn, study, storage_url)
        info = _study_info(conn, [sid])[sid]
        finite = (
            sa.select(t.c.trial_id, v.c.value)
            .join(v, v.c.trial_id == t.c.trial_id)
            .where(
                t.c.study_id == sid,
                t.c.state == TrialState.COMPLETE,
                v.c.objective == 0,
                v.c.value_type == models.TrialValueModel.TrialValueType.FINITE,
            )
            .order_by(t.c.trial_id)
        )
        ids = [r[0] for r in conn.execute(finite.with_only_columns(t.c.trial_id))]
        swept = {
            tid: _attr(value)
            for tid, value in conn.execute(
                sa.select(u.c.trial_id, u.c.value_json)
                .join(t, t.c.trial_id == u.c.trial_id)
                .where(t.c.study_id == sid, u.c.key == "sweeps")
            )
        }
        chosen = ids
        if len(ids) > size:
            kept = [i for i in ids if i in swept][:size]
            rest = [i for i in ids if i not in swept]
            chosen = sorted(kept + random.Random(seed).sample(rest, min(len(rest), size - len(kept))))
        trials: dict[int, SimpleNamespace] = {}
        external = _decoder()
        parsed: dict[str, optuna.distributions.BaseDistribution] = {}
        for lo in range(0, len(chosen), 1000):  # IN lists of 1,000: within every backend's limits
            part = chosen[lo : lo + 1000]
            for tid, number, value in conn.execute(
                sa.select(t.c.trial_id, t.c.number, v.c.value)
                .join(v, v.c.trial_id == t.c.trial_id)
                .where(t.c.trial_id.in_(part), v.c.objective == 0)
            ):
                sweeps = swept.get(tid)
                trials[tid] = SimpleNamespace(
                    number=number,
                    state=TrialState.COMPLETE,
                    value=float(value),
                    params={},
                    distributions={},
                    user_attrs={} if sweeps is None else {"sweeps": sweeps},
                )
            for tid, name, value, dist in conn.execute(
                sa.select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json).where(
                    p.c.trial_id.in_(part), p.c.param_name.in_(list(params))
                )
            ):
                if dist not in parsed:
                    parsed[dist] = optuna.distributions.json_to_distribution(dist)
                trials[tid].params[name] = external(dist, value)
                trials[tid].distributions[name] = parsed[dist]
    ordered = sorted(trials.values(), key=lambda x: x.number)
    direction = info.directions[0] if info.directions else optuna.study.StudyDirection.MINIMIZE
    return TrialsView(info.user_attrs, direction, ordered, len(ids), seed)


def finished_trials(storage_url: str, study: str, attrs_of: Container[int] = ()) -> list[dict[str, Any]]:
    """Every finished trial of a study by SQL, as ``trial_id``, ``number`` and ``state`` (name) only, oldest first;
    the trials whose ids are in ``attrs_of`` with their ``user_attrs`` too (``hpo run``'s all-failed check reads a
    100,000-trial study in one pass of three columns, not as ``FrozenTrial`` s).

    Raises:
        StudyError: no such study.
    """
    t = models.TrialModel.__table__
    done = [s for s in TrialState if s.is_finished()]
    with _connected(storage_url) as conn:
        sid = _sid(conn, study, storage_url)
        rows = [
            {
                "trial_id": tid,
                "number": number,
                "state": state.name if isinstance(state, TrialState) else str(state),
            }
            for tid, number, state in conn.execute(
                sa.select(t.c.trial_id, t.c.number, t.c.state)
                .where(t.c.study_id == sid, t.c.state.in_(done))
                .order_by(t.c.trial_id)
            )
        ]
        wanted = [r["trial_id"] for r in rows if r["trial_id"] in attrs_of]
        u = models.TrialUserAttributeModel.__table__
        attrs: dict[int, dict[str, Any]] = {}
        for lo in range(0, len(wanted), 1000):  # IN lists of 1,000: within every backend's limits
            stmt = sa.select(u.c.trial_id, u.c.key, u.c.value_json).where(u.c.trial_id.in_(wanted[lo : lo + 1000]))
            for tid, key, value in conn.execute(stmt):
                attrs.setdefault(tid, {})[key] = _attr(value)
    for r in rows:
        if r["trial_id"] in attrs_of:
            r["user_attrs"] = attrs.get(r["trial_id"], {})
    return rows

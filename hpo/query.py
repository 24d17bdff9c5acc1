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
from typing import Any

import optuna
import pandas as pd
import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError, StudyError
from hpo.storage import best_of, is_feasible, mask, open_read_only, quiet_optuna

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
        ``strategy`` (the ``auto`` sampler's, in words), ``checkpoint_mb`` (checkpoints held by the study's trials; None where none ever checkpointed).
    """
    storage = _storage(storage_url)
    t = models.TrialModel.__table__
    stmt = sa.select(
        t.c.study_id,
        t.c.state,
        sa.func.count(),
        sa.func.min(t.c.datetime_start),
        sa.func.max(t.c.datetime_complete),
    ).group_by(t.c.study_id, t.c.state)
    with quiet_optuna():
        frozen = storage.get_all_studies()
    with storage.engine.connect() as conn:
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
    for fs in frozen:
        sid = fs._study_id
        c = counts.get(sid, {})
        best_value: float | None = None
        best_trial: int | None = None
        if len(fs.directions) == 1 and c.get("complete"):
            bt = _best_trial(storage, sid, fs.directions[0])
            if bt is not None:
                best_value, best_trial = bt.value, bt.number
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
                "strategy": cell(fs.user_attrs.get("strategy")),  # the auto sampler's, in words (hpo.auto_sampler)
                "checkpoint_mb": round(ckpt_bytes[sid] / 2**20, 3) if sid in ckpt_bytes else None,
            }
        )
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


def _row(t: FrozenTrial, metrics: Sequence[str] = ("value",)) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    row: dict[str, Any] = {"number": t.number, "state": t.state.name}
    if len(metrics) > 1:
        row.update((m, t.values[i] if t.values is not None else None) for i, m in enumerate(metrics))
    else:
        row["value"] = t.value if t.values is not None and len(t.values) == 1 else (t.values and list(t.values))
    for k, v in sorted(t.params.items()):
        row[f"params_{k}"] = v if not isinstance(v, list | tuple) else str(list(v))
    row.update(
        {
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration": duration,
        }
    )
    for k in TRIAL_ATTRS:
        row[k] = cell(t.user_attrs.get(k))
    return row


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


def param_names(storage: optuna.storages.RDBStorage, study_id: int) -> list[str]:
    """Every parameter of a study, sorted: its stored study file's space and any parameter a trial has (one query)."""
    p, t = models.TrialParamModel.__table__, models.TrialModel.__table__
    stmt = sa.select(p.c.param_name).distinct().join(t, t.c.trial_id == p.c.trial_id).where(t.c.study_id == study_id)
    with storage.engine.connect() as conn:
        names = {r[0] for r in conn.execute(stmt)}
    stored = storage.get_study_user_attrs(study_id).get("hpo:spec")
    if isinstance(stored, dict) and isinstance(stored.get("space"), dict):
        names |= set(stored["space"])
    return sorted(names)


def study_params(storage_url: str, study: str) -> list[str]:
    """The parameter names of a study (:func:`param_names`), sorted; for columns that do not depend on which trials
    were read.

    Raises:
        StudyError: no such study.
    """
    storage = _storage(storage_url)
    return param_names(storage, _study_id(storage, study, storage_url))


def study_metrics(storage_url: str, study: str) -> list[str]:
    """A study's metric names, one per objective (:func:`metric_names`).

    Raises:
        StudyError: no such study.
    """
    storage = _storage(storage_url)
    return metric_names(storage, _study_id(storage, study, storage_url))


def _frame(
    trials: Sequence[FrozenTrial], names: Sequence[str] = (), metrics: Sequence[str] = ("value",)
) -> pd.DataFrame:
    rows = [_row(t, metrics) for t in trials]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(
            columns=[
                "number",
                "state",
                *_value_columns(metrics),
                *(f"params_{n}" for n in names),
                "datetime_start",
                "datetime_complete",
                "duration",
                *TRIAL_ATTRS,
            ]
        )
    for n in names:  # the study's parameters, whichever trials were read
        if f"params_{n}" not in df:
            df[f"params_{n}"] = None
    fixed = ["number", "state", *_value_columns(metrics)]
    params = sorted(c for c in df.columns if c.startswith("params_"))
    rest = [c for c in df.columns if c not in fixed and c not in params]
    return df[fixed + params + rest].reset_index(drop=True)


def _limited_ids(
    storage: optuna.storages.RDBStorage, study_id: int, states: tuple[TrialState, ...] | None, limit: int
) -> list[int]:
    t = models.TrialModel.__table__
    stmt = sa.select(t.c.trial_id).where(t.c.study_id == study_id)
    if states is not None:
        stmt = stmt.where(t.c.state.in_(list(states)))
    stmt = stmt.order_by(t.c.number).limit(limit)
    with storage.engine.connect() as conn:
        return [r[0] for r in conn.execute(stmt)]


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
    storage, sid, frozen = _load_trials(storage_url, study, states, limit)
    return _frame(frozen, param_names(storage, sid), metric_names(storage, sid))


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
    storage, sid, frozen = _load_trials(storage_url, study, states, limit)
    metrics = metric_names(storage, sid)
    return [trial_record(t, metrics) for t in frozen]


def _load_trials(
    storage_url: str, study: str, states: Iterable[str | TrialState] | None, limit: int | None
) -> tuple[optuna.storages.RDBStorage, int, list[FrozenTrial]]:
    if limit is not None and limit < 0:
        raise HpoError(f"limit must be >= 0 (got {limit})")
    wanted = parse_states(states)
    storage = _storage(storage_url)
    sid = _study_id(storage, study, storage_url)
    if limit is None:
        frozen = storage.get_all_trials(sid, deepcopy=False, states=wanted)
    else:
        frozen = [storage.get_trial(tid) for tid in _limited_ids(storage, sid, wanted, limit)]
    return storage, sid, sorted(frozen, key=lambda t: t.number)


def _direction(storage: optuna.storages.RDBStorage, sid: int, study: str) -> optuna.study.StudyDirection:
    directions = storage.get_study_directions(sid)
    if len(directions) != 1:
        raise StudyError(f"study {study!r} has {len(directions)} objectives; best trials need exactly one")
    return directions[0]


def _best_trial(
    storage: optuna.storages.RDBStorage, sid: int, direction: optuna.study.StudyDirection
) -> FrozenTrial | None:
    """Optuna's ``study.best_trial``: its best-value query, and where that trial breaks a constraint, the best of the
    feasible COMPLETE trials (None where none completed or none is feasible)."""
    try:
        bt = storage.get_best_trial(sid)
    except ValueError:
        return None
    if is_feasible(bt):
        return bt
    return best_of(storage.get_all_trials(sid, deepcopy=False, states=(TrialState.COMPLETE,)), direction)


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

    ``n == 1`` is Optuna's own best-trial query; for more, SQL ranks them (``ORDER BY ... LIMIT n``).

    Returns:
        :func:`trial_record` dicts (``number``, ``state``, ``value``, ``params``, ``datetime_start``,
        ``datetime_complete``, ``duration``, ``user_attrs``; several objectives: ``values`` by metric name too).
    """
    if n is not None and n < 1:
        raise HpoError(f"n must be >= 1 (got {n})")
    storage = _storage(storage_url)
    sid = _study_id(storage, study, storage_url)
    if len(storage.get_study_directions(sid)) > 1:
        return _front(storage, study, sid)[:n]
    n = 1 if n is None else n
    direction = _direction(storage, sid, study)
    if n == 1:
        bt = _best_trial(storage, sid, direction)
        chosen = [bt] if bt is not None else []
    else:
        with storage.engine.connect() as conn:
            infeasible = _infeasible_ids(conn, sid)  # constraints: Optuna's best is among the feasible only
        ranked = _best_ids(storage.engine, sid, direction, n + len(infeasible))
        chosen = [storage.get_trial(tid) for tid in [i for i in ranked if i not in infeasible][:n]]
    return [trial_record(t) for t in chosen]


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
    s = study if isinstance(study, optuna.Study) else load_study(storage_url, study)
    rows = [
        {"number": t.number, "state": t.state.name, "step": step, "value": value}
        for t in s.get_trials(deepcopy=False)
        for step, value in sorted(t.intermediate_values.items())
    ]
    return pd.DataFrame(rows, columns=["number", "state", "step", "value"])


#: trials per chunk of a streamed export (:func:`iter_trials`): a few MB held at a time, whatever the study's size.
CHUNK = 5_000


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
    storage = _storage(storage_url)
    sid = _study_id(storage, study, storage_url)
    names, metrics = param_names(storage, sid), metric_names(storage, sid)
    return names, metrics, _chunks(storage.engine, sid, wanted, limit, user_attrs, chunk)


def _chunks(
    engine: sa.Engine,
    sid: int,
    wanted: tuple[TrialState, ...] | None,
    limit: int | None,
    user_attrs: Sequence[str] | None,
    chunk: int,
) -> Iterator[dict[str, Any]]:
    """Keyset pagination on ``trial_id`` (the primary key: Optuna numbers a study's trials in trial_id order, and
    ``trials`` has no index on (study_id, number)); each chunk's params, values and attributes by the range of its ids (an index range scan; rows of other studies
    or states in the range are read and dropped)."""
    t, p = models.TrialModel.__table__, models.TrialParamModel.__table__
    v, u = models.TrialValueModel.__table__, models.TrialUserAttributeModel.__table__
    external = _decoder()
    to_value = models.TrialValueModel.stored_repr_to_value
    left = limit
    last = -1
    while left is None or left > 0:
        size = chunk if left is None else min(chunk, left)
        head = sa.select(t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete).where(
            t.c.study_id == sid, t.c.trial_id > last
        )
        if wanted is not None:
            head = head.where(t.c.state.in_(list(wanted)))
        with engine.connect() as conn:
            rows = conn.execute(head.order_by(t.c.trial_id).limit(size)).all()
            if not rows:
                return
            ids = [r[0] for r in rows]
            params: dict[int, dict[str, Any]] = {}
            for tid, name, value, dist in conn.execute(
                sa.select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json)
                .where(p.c.trial_id.between(ids[0], ids[-1]))
                .order_by(p.c.param_id)
            ).all():
                params.setdefault(tid, {})[name] = external(dist, value)
            values: dict[int, dict[int, float]] = {}
            for tid, objective, value, kind in conn.execute(
                sa.select(v.c.trial_id, v.c.objective, v.c.value, v.c.value_type).where(
                    v.c.trial_id.between(ids[0], ids[-1])
                )
            ).all():
                values.setdefault(tid, {})[objective] = to_value(value, kind)
            attrs_stmt = sa.select(u.c.trial_id, u.c.key, u.c.value_json).where(u.c.trial_id.between(ids[0], ids[-1]))
            if user_attrs is not None:
                attrs_stmt = attrs_stmt.where(u.c.key.in_(list(user_attrs)))
            attrs: dict[int, dict[str, Any]] = {}
            for tid, key, value_json in conn.execute(attrs_stmt.order_by(u.c.trial_user_attribute_id)).all():
                attrs.setdefault(tid, {})[key] = _attr(value_json)
        for tid, number, state, start, done in sorted(rows, key=lambda r: r[1]):
            vals = values.get(tid)
            yield {
                "number": number,
                "state": state.name if isinstance(state, TrialState) else str(state),
                "values": [vals[k] for k in sorted(vals)] if vals else None,
                "params": params.get(tid, {}),
                "datetime_start": start,
                "datetime_complete": done,
                "user_attrs": attrs.get(tid, {}),
            }
        last = ids[-1]
        if left is not None:
            left -= len(rows)
        if len(rows) < size:
            return


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


def _best_ids(engine: sa.Engine, sid: int, direction: optuna.study.StudyDirection, n: int) -> list[int]:
    """The ids of the ``n`` best COMPLETE trials, ranked by SQL (infinities by their stored type), ties by number."""
    t, v = models.TrialModel.__table__, models.TrialValueModel.__table__
    kind = models.TrialValueModel.TrialValueType
    maximize = direction == optuna.study.StudyDirection.MAXIMIZE
    first, last = (kind.INF_POS, kind.INF_NEG) if maximize else (kind.INF_NEG, kind.INF_POS)
    rank = sa.case((v.c.value_type == first, 0), (v.c.value_type == last, 2), else_=1)
    stmt = (
        sa.select(t.c.trial_id)
        .join(v, v.c.trial_id == t.c.trial_id)
        .where(t.c.study_id == sid, t.c.state == TrialState.COMPLETE, v.c.objective == 0)
        .order_by(rank, v.c.value.desc() if maximize else v.c.value.asc(), t.c.number)
        .limit(n)
    )
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(stmt)]

"""Creating and loading an hpo study: the study file stored with it, checked against the file a worker brings."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import optuna

import hpo
from hpo import space as search_space
from hpo.design import design_identity, design_trials
from hpo.errors import HpoError, StudyError
from hpo.limits import MIN_GRACE_S
from hpo.objectives import Context, resolve, resolve_device, trial_seed
from hpo.pruners import make_pruner
from hpo.samplers import make_sampler
from hpo.spec import StudySpec, parse_spec, stored_form
from hpo.storage import budget_lock, mask, open_storage, quiet_optuna
from hpo.worker.lease import DEFAULT_GRACE_S, GRACE_ATTR

log = logging.getLogger(__name__)

SPEC_ATTR = "hpo:spec"


def create(
    spec: StudySpec,
    storage_url: str,
    storage: optuna.storages.BaseStorage | None = None,
    grace: float | None = None,
    **storage_kwargs: Any,
) -> optuna.Study:
    """Create the study once (idempotent); store the study file with it; enqueue its baseline trials once.

    ``grace`` (seconds; default :data:`hpo.worker.lease.DEFAULT_GRACE_S`) is stored as the study's grace period when
    the study has none yet (:func:`set_grace` changes it).

    Safe when many workers start at once with the same file: the file is stored and its trials enqueued under the
    study's budget lock, by the first worker only.

    Raises:
        StudyError: the study exists and its stored search space or direction differs from the file's.
    """
    from hpo.preflight import preflight

    if grace is not None:
        check_grace(grace)
    preflight(spec, f"study {spec.name!r}")  # before anything is written
    storage = storage if storage is not None else open_storage(storage_url, **storage_kwargs)
    with quiet_optuna():
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            directions=spec.directions_list,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec.pruner),
            load_if_exists=True,
        )
    with budget_lock(storage, spec.name):
        _store_spec(spec, study)
        if GRACE_ATTR not in study.user_attrs:
            study.set_user_attr(GRACE_ATTR, float(grace if grace is not None else DEFAULT_GRACE_S))
    return study


def set_grace(study: optuna.Study, seconds: float) -> None:
    """Change a study's grace period: seconds without a heartbeat before any worker or ``hpo reap`` fails a running
    trial and re-queues it. Workers read it at their next reap; a worker that beats less often than every
    ``seconds / 2`` beats every ``seconds / 2`` from its next start.

    Raises:
        HpoError: ``seconds`` is not a number of seconds :func:`check_grace` takes.
    """
    check_grace(seconds)
    study.set_user_attr(GRACE_ATTR, float(seconds))


def check_grace(seconds: float, heartbeat: float | None = None) -> None:
    """Refuse a grace period under :data:`hpo.limits.MIN_GRACE_S` or under two heartbeats: workers would fail each
    other's live trials between two beats (``hpo grace STUDY 0.001``: 11 of 12 trials reaped alive).

    Raises:
        HpoError: one line naming the grace period and the bound.
    """
    if not (seconds > 0 and math.isfinite(seconds)):
        raise HpoError(f"grace period {seconds!r}: give a positive number of seconds")
    if seconds < MIN_GRACE_S:
        raise HpoError(f"grace period {seconds:g} s: at least {MIN_GRACE_S:g} s (two of the shortest heartbeats)")
    if heartbeat is not None and seconds < 2 * heartbeat:
        raise HpoError(
            f"grace period {seconds:g} s: at least 2 x the heartbeat interval ({heartbeat:g} s), or workers fail "
            "each other's live trials between two beats"
        )


def _store_spec(spec: StudySpec, study: optuna.Study) -> None:
    """Store the study file with a new study, after its enqueued and designed trials: ``hpo:spec`` present means the
    study is whole. A study stopped midway (Ctrl-C, a lost connection: the study row exists, no ``hpo:spec``) is
    completed here by the next run, queueing only what is missing, never replaced by sampled trials."""
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is not None:
        mask_stored_spec(study)
        check_agrees(spec, parse_spec(stored, f"stored study {spec.name!r}"), study)
        if spec.design is not None:
            _warn_short_design(spec, study)
        return
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions_list:  # a half-made study of another file: nothing of it is touched
        said, was = ", ".join(spec.directions_list), ", ".join(have)
        raise StudyError(f"study {spec.name!r} is stored with direction {was}, the file says {said}")
    for params in spec.enqueue:
        study.enqueue_trial(search_space.encode_params(params), user_attrs={"enqueued": True}, skip_if_exists=True)
    if spec.design is not None:  # a designed experiment (hpo.design): repeats are wanted, so no skip_if_exists
        for params, attrs in _missing_design_trials(spec, study):
            study.enqueue_trial(params, user_attrs=attrs)
    with warnings.catch_warnings():  # metric names are experimental in Optuna; optuna-dashboard shows them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.metric_names)
    study.set_user_attr("sampler", spec.sampler.model_dump(mode="json"))
    study.set_user_attr("pruner", spec.pruner.model_dump(mode="json"))
    study.set_user_attr("budget", spec.budget.model_dump(mode="json"))
    study.set_user_attr("metric", ",".join(spec.metric_names))  # hpo studies' column; metric names below
    study.set_user_attr("hpo_version", hpo.__version__)
    study.set_user_attr(SPEC_ATTR, stored_form(spec))  # last; never a password: analysts read study attributes


def _queued_design(study: optuna.Study) -> collections.Counter[str]:
    """The design trials the study holds (any state; re-queued copies not counted), by :func:`design_identity`."""
    found: collections.Counter[str] = collections.Counter()
    for t in study.get_trials(deepcopy=False):
        if "design" in t.user_attrs and "requeued_from" not in t.user_attrs:
            params = t.system_attrs.get("fixed_params") or t.params
            found[design_identity(params, t.user_attrs)] += 1
    return found


def _missing_design_trials(spec: StudySpec, study: optuna.Study) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The design's trials (parameters encoded as stored) that the study does not hold yet, in the design's order."""
    assert spec.design is not None
    have = _queued_design(study)
    missing = []
    for params, attrs in design_trials(spec.design, spec.space):
        encoded = search_space.encode_params(params)
        key = design_identity(encoded, attrs)
        if have[key] > 0:
            have[key] -= 1
        else:
            missing.append((encoded, attrs))
    return missing


def _warn_short_design(spec: StudySpec, study: optuna.Study) -> None:
    """A study whose design was cut short by an older hpo (its ``hpo:spec`` was stored before the design): say so."""
    assert spec.design is not None
    want, have = spec.design.n_trials(), sum(_queued_design(study).values())
    if have < want:
        log.warning(
            "study %r holds %d of its design's %d trials (an earlier creation stopped midway); its results answer "
            "less than the design asks: run the file under a new name: to get the whole design",
            spec.name,
            have,
            want,
        )


def mask_stored_spec(study: optuna.Study) -> None:
    """Mask a password stored in the study's ``hpo:spec`` by an hpo older than this rule (a migration, once)."""
    stored = study.user_attrs.get(SPEC_ATTR)
    url = stored.get("storage") if isinstance(stored, dict) else None
    if isinstance(url, str) and mask(url) != url:
        study.set_user_attr(SPEC_ATTR, {**stored, "storage": mask(url)})
        log.warning("study %r: masked the password stored in its study file attribute", study.study_name)


def check_agrees(spec: StudySpec, stored: StudySpec, study: optuna.Study) -> None:
    """A study file must describe the stored study: same directions, metrics and search space."""
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions_list:
        said, was = ", ".join(spec.directions_list), ", ".join(have)
        raise StudyError(f"study {spec.name!r} is stored with direction {was}, the file says {said}")
    if stored.metric_names != spec.metric_names:
        said, was = ", ".join(spec.metric_names), ", ".join(stored.metric_names)
        raise StudyError(f"study {spec.name!r}: the file's metric {said!r} differs from the stored {was!r}")
    added, dropped = sorted(set(spec.space) - set(stored.space)), sorted(set(stored.space) - set(spec.space))
    if added or dropped:
        said = "; ".join(f"{what} {', '.join(names)}" for what, names in (("adds", added), ("drops", dropped)) if names)
        raise StudyError(
            f"study {spec.name!r}: the file's space {said} (the stored study's has {', '.join(stored.space) or 'none'})"
            "; use a new study name"
        )
    mine, theirs = search_space.distributions(spec.space), search_space.distributions(stored.space)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            raise StudyError(
                f"study {spec.name!r}: the file's space.{name} differs from the stored study's "
                f"(file: {mine.get(name)}, stored: {theirs.get(name)}); use a new study name"
            )
    for name in spec.space:
        if name not in mine and _fixed(spec.space[name]) != _fixed(stored.space[name]):
            raise StudyError(
                f"study {spec.name!r}: the file's space.{name} differs from the stored study's "
                f"(file: {_fixed(spec.space[name])!r}, stored: {_fixed(stored.space[name])!r}); use a new study name"
            )
    changed = experiment_changes(spec, stored)
    if changed:
        raise StudyError(
            f"study {spec.name!r} was run with a different experiment: {'; '.join(changed)}; "
            "to start a new study with it, change the file's name: field"
        )


def _fixed(p: Any) -> Any:
    """A fixed space entry's value (``{value: 0.9}`` or ``0.9``)."""
    return getattr(p, "value", p)


#: Objective fields that say how a trial runs, not what it measures: they may change between runs of one study.
RUN_FIELDS = frozenset({"threads", "device", "checkpoint"})


def experiment_changes(spec: StudySpec, stored: StudySpec) -> list[str]:
    """Each objective field (model, loss, data, defaults, seed, ...) where the file differs from the stored study,
    as ``objective.model.layers (file: [32, 32], stored: [16])``."""
    found: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(f"{path}.{key}", a.get(key), b.get(key))
        elif a != b:
            found.append(f"{path} (file: {a!r}, stored: {b!r})")

    mine = spec.objective.model_dump(mode="json", exclude=set(RUN_FIELDS))
    theirs = stored.objective.model_dump(mode="json", exclude=set(RUN_FIELDS))
    walk("objective", mine, theirs)
    return found


def load(
    study_name: str,
    storage: optuna.storages.BaseStorage,
    check: Callable[[StudySpec], None] | None = None,
) -> tuple[optuna.Study, StudySpec]:
    """Load a study created by hpo, with the study file stored in it.

    ``check`` sees the stored file before anything uses it (a worker started by name: :func:`hpo.trust.check_stored`,
    since anyone with the worker login can rewrite it); it raises to refuse it.
    """
    try:
        summary = optuna.study.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
    except KeyError:
        raise StudyError(f"no study named {study_name!r} in this storage") from None
    stored = summary.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise StudyError(
            f"study {study_name!r} was not created by hpo (no stored study file); run it with a study file"
        )
    spec = parse_spec(stored, f"stored study {study_name!r}")
    if check is not None:
        check(spec)
    with contextlib.suppress(Exception):  # a read-only role cannot migrate; what it reads is masked by the worker
        mask_stored_spec(summary)
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec, callables=False),  # a stored constraints_func is code: the worker adds it
        pruner=make_pruner(spec.pruner),
    )
    return study, spec


def replay(spec: StudySpec, frozen: optuna.trial.FrozenTrial) -> float | tuple[float, ...]:
    """Run a stored trial again with its parameters and seed, outside the study (nothing is stored).

    On the CPU the result equals the stored value exactly (several objectives: a tuple; ``train_seconds`` is a time
    and differs).
    """
    params = search_space.suggest(optuna.trial.FixedTrial(frozen.params, frozen.number), spec.space)
    seed = int(frozen.user_attrs.get("seed", trial_seed(spec, frozen.number)))
    ctx = Context(
        spec=spec, params=params, seed=seed, threads=None, device=resolve_device(frozen.user_attrs.get("device", "cpu"))
    )
    value = resolve(spec.objective.kind)(optuna.trial.FixedTrial(frozen.params, frozen.number), ctx)
    return tuple(float(v) for v in value) if spec.multi_objective else float(value)

"""The dashboard refuses writes by default (403, study unchanged), in process through its WSGI app."""

from __future__ import annotations

import io
import json
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpo.dashboard import create_app

from .analyst_helpers import mixed_study


def call(app: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    from wsgiref.util import setup_testing_defaults

    data = json.dumps(body or {}).encode()
    env: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(data)),
        "wsgi.input": io.BytesIO(data),
    }
    setup_testing_defaults(env)
    status: list[str] = []
    chunks = app(env, lambda s, headers, exc_info=None: status.append(s))
    payload = b"".join(chunks)
    return int(status[0].split()[0]), payload


def snapshot(url: str, name: str) -> list[tuple[int, str, float | None]]:
    s = optuna.load_study(study_name=name, storage=url)
    return [(t.number, t.state.name, t.value) for t in s.get_trials()]


@pytest.fixture
def pg_study(postgres_url: str, study_name: str) -> tuple[str, str, optuna.Study]:
    return postgres_url, study_name, mixed_study(postgres_url, study_name, n=12)


def test_read_only_dashboard_refuses_delete_and_tell(pg_study: tuple[str, str, optuna.Study]) -> None:
    url, name, study = pg_study
    before = snapshot(url, name)
    app = create_app(url)
    code, body = call(app, "GET", "/api/studies")
    assert code == 200 and name in body.decode()
    sid = study._study_id
    code, body = call(app, "DELETE", f"/api/studies/{sid}")
    assert code == 403 and json.loads(body)["error"] == "read_only" and "read-only" in json.loads(body)["reason"]
    running = [t for t in study.get_trials() if t.state == TrialState.FAIL][0]
    code, _ = call(app, "POST", f"/api/trials/{running._trial_id}/tell", {"state": "Complete", "values": [1.0]})
    assert code == 403
    for method, path in [
        ("PUT", f"/api/studies/{sid}/note"),
        ("PATCH", f"/api/studies/{sid}"),
        ("POST", f"/api/studies/{sid}/rename"),
    ]:
        assert call(app, method, path, {"study_name": "x", "version": 1, "body": "x"})[0] == 403
    assert snapshot(url, name) == before
    assert name in [s.study_name for s in optuna.get_all_study_summaries(url)]


def test_read_only_storage_holds_without_the_guard(pg_study: tuple[str, str, optuna.Study]) -> None:
    """Second layer: optuna-dashboard without hpo's guard, on hpo's read-only storage, still cannot delete."""
    import optuna_dashboard

    from hpo.storage import open_read_only

    url, name, study = pg_study
    before = snapshot(url, name)
    bare = optuna_dashboard.wsgi(open_read_only(url))
    code, _ = call(bare, "DELETE", f"/api/studies/{study._study_id}")
    assert code >= 400
    assert snapshot(url, name) == before


def test_allow_writes_lets_delete_through(pg_study: tuple[str, str, optuna.Study]) -> None:
    url, name, study = pg_study
    app = create_app(url, allow_writes=True)
    code, _ = call(app, "DELETE", f"/api/studies/{study._study_id}")
    assert code == 204
    assert name not in [s.study_name for s in optuna.get_all_study_summaries(url)]

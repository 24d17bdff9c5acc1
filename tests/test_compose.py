"""docker-compose.yml and Dockerfile: what can be checked without a Docker engine, and the worker's command run natively.

No Docker engine runs here, so the compose file is parsed (PyYAML), its commands are parsed by hpo's own typer app,
and the init service's and then the worker service's exact commands and environments (host ``db`` pointed at the
machine's PostgreSQL, secrets written to files) run natively: the roles are made, and a study is run under the
worker role until it is done.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
import typer
import yaml
from optuna.trial import TrialState

from hpo.cli import app
from hpo.storage import open_storage

from .conftest import ROOT, write_study
from .timing import ceiling

COMPOSE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")
PASSWORDS = {"POSTGRES_PASSWORD": "admin-pw", "HPO_WORKER_PASSWORD": "worker-pw", "HPO_ANALYST_PASSWORD": "analyst-pw"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` and ``${VAR:?error}`` substitution ($$ is a literal $)."""

    def sub(m: re.Match[str]) -> str:
        if env.get(m.group(1)):
            return env[m.group(1)]
        if m.group(2) == "?":
            raise KeyError(f"{m.group(1)}: {m.group(3)}")
        return m.group(3) or ""

    return _VAR.sub(sub, value).replace("$$", "$")


def command(service: dict[str, Any], env: dict[str, str]) -> list[str]:
    cmd = service["command"]
    assert isinstance(cmd, list), "use the exec form, so the hpo process receives docker stop's SIGTERM"
    return [interpolate(str(part), env) for part in cmd]


def parse_hpo(argv: list[str]) -> None:
    """Parse an ``hpo ...`` command line with the real typer app, without running it (raises on a bad option)."""
    assert argv[0] == "hpo"
    group = typer.main.get_command(app)
    ctx = group.make_context("hpo", argv[1:])
    sub = group.get_command(ctx, argv[1])  # type: ignore[attr-defined]
    assert sub is not None, f"hpo has no command {argv[1]!r}"
    sub.make_context(argv[1], argv[2:], parent=ctx)


def test_services_volume_and_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"db", "init", "worker", "dashboard"} <= set(services)
    db = services["db"]
    assert db["image"].startswith("postgres")
    assert any(v.split(":")[0] in compose["volumes"] for v in db["volumes"])  # a named volume keeps the data
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert services["init"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["init"]["restart"] == "no"  # a one-shot step
    for name in ("worker", "dashboard"):
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_passwords_only_as_secrets(compose: dict[str, Any]) -> None:
    """No password in any service's environment or command; each service gets only its own secret."""
    services = compose["services"]
    secrets = {name: s["environment"] for name, s in compose["secrets"].items()}
    assert set(secrets.values()) == set(PASSWORDS)
    for name, service in services.items():
        env = {k: interpolate(str(v), {}) for k, v in service["environment"].items()}
        assert not any(k.endswith("PASSWORD") for k in env), f"{name} has a password variable"
        for value in list(env.values()) + [str(c) for c in service.get("command", [])]:
            assert not any(pw in value for pw in PASSWORDS.values())
            if "://" in value:
                assert ":" not in value.split("://", 1)[1].split("@")[0], f"{name}: a password in {value}"
        for var, path in env.items():
            if var.endswith("PASSWORD_FILE"):
                assert path.startswith("/run/secrets/") and path.removeprefix("/run/secrets/") in service["secrets"]
    storage = {n: interpolate(services[n]["environment"]["HPO_STORAGE"], {}) for n in ("init", "worker", "dashboard")}
    assert storage == {
        "init": "postgresql+psycopg://hpo@db:5432/hpo",
        "worker": "postgresql+psycopg://hpo_worker@db:5432/hpo",
        "dashboard": "postgresql+psycopg://hpo_analyst@db:5432/hpo",
    }
    assert services["worker"]["secrets"] == ["hpo_worker_password"]
    assert services["dashboard"]["secrets"] == ["hpo_analyst_password"]
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    text = COMPOSE.read_text()
    for var in PASSWORDS:  # compose refuses to start without each password
        assert f"${{{var}:?" in text
        with pytest.raises(KeyError):
            interpolate(text, {k: v for k, v in PASSWORDS.items() if k != var})
    example = (ROOT / ".env.example").read_text()
    assert all(f"{var}=" in example for var in PASSWORDS)


def test_only_localhost_ports_and_a_scalable_worker(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # either would stop --scale worker=8
    assert compose["services"]["dashboard"]["ports"]


def test_commands_are_real_hpo_commands(compose: dict[str, Any]) -> None:
    init = command(compose["services"]["init"], {})
    assert init[:3] == ["hpo", "db", "init"]
    group = typer.main.get_command(app)
    db_group = group.get_command(group.make_context("hpo", ["db"]), "db")  # type: ignore[attr-defined]
    db_group.get_command(None, "init").make_context("init", init[3:])
    worker = command(compose["services"]["worker"], {})
    assert worker[:2] == ["hpo", "worker"]
    assert (ROOT / worker[2]).is_file()  # the default study file ships with the image
    parse_hpo(worker)
    dashboard = command(compose["services"]["dashboard"], {})
    assert dashboard[:2] == ["hpo", "dashboard"]
    if "dashboard" not in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        pytest.skip("hpo dashboard is not written yet; the worker command was checked")
    parse_hpo(dashboard)


def test_dockerfile_installs_cpu_torch_then_hpo() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch = text.index("torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert torch < text.index("pip install -c deploy/constraints.txt .")


def test_the_images_python_dependencies_are_pinned() -> None:
    """Issue 22 item 8: the image installs every runtime dependency of hpo, and theirs, at an exact version
    (deploy/constraints.txt) that satisfies pyproject.toml's range."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert "COPY deploy/constraints.txt" in (ROOT / "Dockerfile").read_text()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, seen = [Requirement(r) for r in declared], set()
    while todo:  # the runtime closure, as installed here
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        if name == "torch":  # installed first from PyTorch's CPU index at its own pin
            continue
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        if req in [Requirement(r) for r in declared]:
            assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(req.specifier))
        dist = md.distribution(req.name)
        for extra in req.extras:
            todo += [
                Requirement(r)
                for r in dist.requires or []
                if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": extra})
            ]
        todo += [
            Requirement(r)
            for r in dist.requires or []
            if not (Requirement(r).marker and "extra" in str(Requirement(r).marker))
        ]


def native_env(service: dict[str, Any], compose_env: dict[str, str], secrets: Path, database: str) -> dict[str, str]:
    """A service's environment as it would be in its container, with host ``db`` pointed at the local server and
    ``/run/secrets`` at a folder here."""
    env = {k: interpolate(str(v), compose_env) for k, v in service["environment"].items()}
    env["HPO_STORAGE"] = env["HPO_STORAGE"].replace("@db:5432/", "@127.0.0.1:5432/")
    for var, value in env.items():
        if var.endswith("_FILE"):
            env[var] = value.replace("/run/secrets", str(secrets))
    assert env["HPO_STORAGE"].endswith(f"/{database}")
    return {**os.environ, **env}


def test_init_then_worker_commands_run_natively_to_completion(
    compose: dict[str, Any], postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    url = sqlalchemy.engine.make_url(postgres_url)
    tag = uuid.uuid4().hex[:8]
    study = write_study(tmp_path / "study.yaml", study_name, budget={"n_trials": 3})
    compose_env = {
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_DB": url.database or "",
        "HPO_WORKER_ROLE": f"hpo_w_{tag}",
        "HPO_ANALYST_ROLE": f"hpo_a_{tag}",
        "HPO_STUDY_FILE": str(study),
    }
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, spec in compose["secrets"].items():
        (secrets / name).write_text(PASSWORDS[spec["environment"]])  # as compose writes it: no newline
    services = compose["services"]
    try:
        init = subprocess.run(
            [sys.executable, "-m", "hpo", *command(services["init"], compose_env)[1:]],
            env=native_env(services["init"], compose_env, secrets, url.database or ""),
            capture_output=True,
            text=True,
            timeout=ceiling(120),
        )
        assert init.returncode == 0, init.stderr
        argv = command(services["worker"], compose_env)
        env = native_env(services["worker"], compose_env, secrets, url.database or "")
        assert f"hpo_w_{tag}@" in env["HPO_STORAGE"]  # the worker role, not the admin
        procs = [
            subprocess.Popen([sys.executable, "-m", "hpo", *argv[1:]], env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for p in procs:
            _, stderr = p.communicate(timeout=ceiling(300))
            assert p.returncode == 0, stderr
        dash = native_env(services["dashboard"], compose_env, secrets, url.database or "")
        studies = subprocess.run(
            [sys.executable, "-m", "hpo", "studies", "-f", "json"], env=dash, capture_output=True, text=True
        )
        assert studies.returncode == 0 and study_name in studies.stdout, studies.stderr  # the analyst role reads
    finally:
        engine = sqlalchemy.create_engine(
            postgres_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
        )
        with engine.connect() as conn:
            for role in (f"hpo_w_{tag}", f"hpo_a_{tag}"):
                if conn.execute(sqlalchemy.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar():
                    conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
                    conn.exec_driver_sql(f'DROP ROLE "{role}"')
        engine.dispose()
    storage = open_storage(postgres_url)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    storage.engine.dispose()
    assert len(trials) == 3
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["threads"] for t in trials} == {1}


def test_workers_stop_inside_the_kill_window_and_checkpoint_to_a_volume(compose: dict[str, Any]) -> None:
    """docker stop waits stop_grace_period before SIGKILL: wider than the worker's --stop-timeout (at 30 s each,
    SIGKILL came first and left the trial RUNNING); checkpoints go to a named volume the image's user owns."""
    from hpo.worker.options import DEFAULT_STOP_TIMEOUT_S

    worker = compose["services"]["worker"]
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) >= DEFAULT_STOP_TIMEOUT_S + 20
    assert DEFAULT_STOP_TIMEOUT_S < 30  # docker's, Slurm's KillWait and Kubernetes' default window
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert mounts["/var/lib/hpo/checkpoints"] in compose["volumes"]
    dockerfile = (Path(__file__).parent.parent / "Dockerfile").read_text()
    assert "ENV HPO_CHECKPOINT_DIR=/var/lib/hpo/checkpoints" in dockerfile
    assert "chown hpo:hpo /var/lib/hpo/checkpoints" in dockerfile


def test_services_hardened_and_images_pinned(compose: dict[str, Any]) -> None:
    """Issue 22 item 8: every service drops all capabilities, may not gain privileges, runs on a read-only root
    filesystem with /tmp in memory, as a non-root user; images carry exact versions; the database has a memory cap."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name, service in compose["services"].items():
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+(\.\d+)?", image), image
        if "build" in service:
            assert image == f"hpo:{version}" and "USER hpo" in dockerfile, name  # the image's own user, uid 1000
        else:
            assert service["user"] == "999:999" and "/var/run/postgresql" in service["tmpfs"], name
    assert compose["services"]["db"]["mem_limit"] and compose["services"]["worker"]["mem_limit"]


def test_env_example_ships_no_password(compose: dict[str, Any]) -> None:
    """.env.example's placeholders passed compose's empty-value check and reached the database; now they are empty,
    and compose stops on each (the ``:?`` in docker-compose.yml) until it is set."""
    env = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert {k: v for k, v in env.items() if k.endswith("PASSWORD")} == dict.fromkeys(PASSWORDS, "")
    for required in compose["x-required-passwords"]:
        with pytest.raises(KeyError, match="set .* in .env"):
            interpolate(required, env)

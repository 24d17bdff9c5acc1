"""``deploy/slurm/hpo-worker.sbatch`` on a real one-node Slurm cluster started by the test.

The cluster is Debian's ``slurm-wlm`` with ``munge`` (``.ci/run`` installs both): a configuration generated in a
temporary folder, ``munged``, ``slurmctld`` and ``slurmd`` started for the test and stopped after it. An array of four
``hpo worker`` tasks runs a PostgreSQL study to its budget; one task is cancelled with ``scancel`` mid-trial, and its
trial is re-queued and finished by another task.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo.storage import open_storage

from .conftest import ROOT, hpo_cli, write_study
from .timing import ceiling

TESTS = Path(__file__).resolve().parent
SCRIPT = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "squeue", "scontrol")

pytestmark = pytest.mark.slow


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SLURM_CONF = """\
ClusterName=hpotest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
SchedulerParameters=sched_interval=1
NodeName={host} CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(
            [_exe(cmd[0]), *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=ceiling(60)
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(mode=0o700)
        key = d / "munge.key"
        subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(SLURM_CONF.format(host=host, dir=d, ctld_port=_free_port(), d_port=_free_port()))
        munge = [
            _exe("munged"), "--foreground", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
            f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed",
        ]  # fmt: skip
        self.procs.append(subprocess.Popen(munge, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(lambda: (d / "munge.socket").exists(), "munged")
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(
                subprocess.Popen(
                    [_exe(daemon), "-D", "-f", str(self.conf)],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False), "the node to be idle")

    def _wait(self, cond: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + ceiling(timeout)
        while time.monotonic() < deadline:
            if cond():  # type: ignore[operator]
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}: {self.logs()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {ceiling(timeout):.0f} s waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.dir.glob("*.log")) if f.is_file()
        )

    def stop(self) -> None:
        self.run("scancel", "--full", "--name", "hpo-worker", check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=ceiling(30))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    missing = _missing()
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (it starts jobs as their users)")
    folder = Path(tempfile.mkdtemp(prefix="hpo-slurm-"))
    folder.chmod(0o700)
    c = Cluster(folder)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def _create_sleepy_study(tmp_path: Path, url: str, name: str, budget: int) -> tuple[Path, dict[str, str]]:
    """A study of 3-second trials created in ``url``: the folder its trials mark their start in, and the environment
    that finds the test objectives."""
    markers = tmp_path / "markers"
    markers.mkdir()
    study = write_study(
        tmp_path / "study.yaml",
        name,
        objective={"kind": "worker_objectives:sleepy", "sleep": 3.0, "marker_dir": str(markers)},
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": budget},
    )
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    assert hpo_cli("create", str(study), "--storage", url, env=env).returncode == 0
    return markers, env


def test_job_array_meets_the_budget_and_a_cancelled_task_trial_is_finished_by_another(
    cluster: Cluster, postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    budget = 12
    markers, env = _create_sleepy_study(tmp_path, postgres_url, study_name, budget)
    url_file = tmp_path / "storage-url"
    url_file.write_text(postgres_url + "\n")
    url_file.chmod(0o600)
    cluster.env.update(
        env,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        HPO_STUDY=study_name,
        HPO_STORAGE_FILE=str(url_file),
        HPO_WORKER_ARGS="--heartbeat 1 --grace 3 --quiet",
        HPO_ALLOW_OBJECTIVES="worker_objectives:sleepy",  # workers started by name run only code their side names
    )
    cluster.env.pop("HPO_STORAGE", None)
    out = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-3", str(SCRIPT))
    job = out.strip().split(";")[0]

    # Wait for a task to run a trial, find that task's own job id by its worker's pid, and cancel it.
    deadline = time.monotonic() + ceiling(120)
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, f"no task started a trial: {cluster.logs()}"
        running: dict[int, int] = {}  # each worker's latest trial
        for f in markers.iterdir():
            pid, n = map(int, f.name.split("-"))
            running[pid] = max(n, running.get(pid, -1))
        for line in cluster.run("scontrol", "listpids", check=False).splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0].isdigit() and int(fields[0]) in running:
                victim = (fields[1], running[int(fields[0])])
                break
        time.sleep(0.2)
    raw_id, number = victim
    ids = dict(line.split() for line in cluster.run("squeue", "-h", "-o", "%A %i").splitlines())
    task_job = ids[raw_id]  # JOB_TASK: scancel takes an array task by that name
    cluster.run("scancel", task_job)

    deadline = time.monotonic() + ceiling(240)
    while cluster.run("squeue", "-h", "-j", job, check=False).strip():
        assert time.monotonic() < deadline, f"the array did not finish: {cluster.logs()}"
        time.sleep(1)

    ts = _trials(postgres_url, study_name)
    assert [t.number for t in ts if t.state == TrialState.RUNNING] == []
    requeued = {n for t in ts for n in t.system_attrs.get("retry_history", ())}
    counted = [
        t for t in ts if t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.number not in requeued)
    ]
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted)
    cancelled = next(t for t in ts if t.number == number)
    assert cancelled.state == TrialState.FAIL and cancelled.user_attrs["reason"] == "interrupted"
    [copy] = [t for t in ts if t.system_attrs.get("failed_trial") == number]
    assert copy.state == TrialState.COMPLETE and copy.params == cancelled.params
    assert copy.user_attrs["worker"] != cancelled.user_attrs["worker"]  # another task finished it
    outputs = "".join(f.read_text() for f in tmp_path.glob(f"hpo-worker-{job}_*.out"))
    assert "array task" in outputs and postgres_url not in outputs  # the URL stays out of logs and command lines
    print(f"slurm: budget {budget}, {len(ts)} trials stored, trial {number} cancelled in job {task_job}, "
          f"finished as trial {copy.number} by {copy.user_attrs['worker']}")  # fmt: skip


@pytest.mark.slow
def test_a_time_limit_requeues_the_task_until_the_budget_is_met(
    cluster: Cluster, postgres_url: str, study_name: str, tmp_path: Path
) -> None:
    """Tasks ended COMPLETED (exit 0) at their time limit with the study at 1 of 30, and nothing resubmitted. Now the
    script's USR1 (sent --signal seconds before the limit) stops the worker (exit 75) and requeues the task, which
    goes on with a fresh limit until the budget is met; nobody resubmits."""
    budget = 10
    _, env = _create_sleepy_study(tmp_path, postgres_url, study_name, budget)
    cluster.env.update(
        env,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        HPO_STUDY=study_name,
        HPO_STORAGE=postgres_url,
        HPO_ALLOW_OBJECTIVES="worker_objectives:sleepy",
        HPO_WORKER_ARGS="--heartbeat 1 --grace 3 --quiet",
    )
    # a 1-minute limit, warned 40 s before it: each run of the task has about 20 s, 6 trials of 3 s
    out = cluster.run(
        "sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0", "--time=1", "--signal=B:USR1@40", str(SCRIPT)
    )
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + ceiling(600)
    while cluster.run("squeue", "-h", "-j", job, check=False).strip():
        assert time.monotonic() < deadline, f"the task did not finish: {cluster.logs()}"
        time.sleep(1)
    ts = _trials(postgres_url, study_name)
    assert [t.number for t in ts if t.state == TrialState.RUNNING] == []
    assert sum(t.state == TrialState.COMPLETE for t in ts) == budget
    log = "".join(p.read_text() for p in tmp_path.glob("hpo-worker-*.out"))
    assert "requeueing task" in log, log  # it did hit the limit, and went on by itself


#: The URL README's Slurm block writes to ~/.hpo/storage-url: the one thing the test points elsewhere.
README_URL = "postgresql+psycopg://hpo_worker@db.example/hpo"


def readme_slurm_block() -> str:
    """The first ``bash`` code block of README's Slurm paragraph, as it stands."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**Slurm.**") :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("```", start)]


def test_the_readmes_slurm_steps_run_as_written(cluster: Cluster, postgres_url: str, tmp_path: Path) -> None:
    """README's Slurm steps failed when followed literally (~/.hpo never created; hpo create made the study in local
    SQLite, so every task ended "no study named ..."). Here the block itself runs, in bash -eu, in a fresh HOME, from
    a folder holding the sbatch script and a small study of the README's name: the study is created in the database
    the URL names, the array of 32 tasks meets its budget, and nothing stays running."""
    block = readme_slurm_block()
    assert block.count(README_URL) == 1, "README's Slurm block changed its URL: update README_URL"
    assert "sbatch" in block and "hpo create" in block
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".hpo").mkdir(parents=True, mode=0o700)
    pw = home / ".hpo" / "worker-pw"  # the block's comment: the password file is yours to write
    pw.write_text("unused-by-a-trust-server\n")
    pw.chmod(0o600)
    (work / "deploy" / "slurm").mkdir(parents=True)
    shutil.copy(SCRIPT, work / "deploy" / "slurm" / SCRIPT.name)
    budget = 4
    (work / "studies").mkdir()
    write_study(  # the README's study name; a small study, so that the test ends soon
        work / "studies" / "spirals-optimizer.yaml",
        "spirals-optimizer",
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": budget},
    )
    storage = open_storage(postgres_url)
    try:  # the session's database may hold a study of that name from another test
        optuna.delete_study(study_name="spirals-optimizer", storage=storage)
    except KeyError:
        pass
    finally:
        storage.engine.dispose()
    env = {k: v for k, v in cluster.env.items() if not k.startswith("HPO_")}
    env.update(HOME=str(home), PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    script = block.replace(README_URL, postgres_url)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True,
        timeout=ceiling(300),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("Submitted batch job")]
    assert len(jobs) == 1, done.stdout
    assert (home / ".hpo" / "storage-url").read_text().strip() == postgres_url

    deadline = time.monotonic() + ceiling(600)
    while cluster.run("squeue", "-h", "-j", jobs[0], check=False).strip():
        assert time.monotonic() < deadline, f"the array did not finish: {cluster.logs()}"
        time.sleep(2)
    ts = _trials(postgres_url, "spirals-optimizer")
    assert [t.number for t in ts if t.state == TrialState.RUNNING] == []
    assert sum(t.state == TrialState.COMPLETE for t in ts) == budget
    outputs = sorted(work.glob(f"hpo-worker-{jobs[0]}_*.out"))
    assert len(outputs) == 32
    text = "".join(f.read_text() for f in outputs)
    assert "no study named" not in text and postgres_url not in text

"""A real PostgreSQL instance: a local server (Debian's `postgresql` package) started for this
module, a DAGSTER_HOME whose dagster.yaml stores runs and events in it, and the CLI run against it,
alone and twice at once with the `gpu` pool making the model stages take turns."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PG_USER = "dagster"


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin/ (Debian keeps each major under /usr/lib/postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _install_postgres() -> None:
    """apt-get install postgresql, as .ci/run does, when we are root on Debian; else nothing."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1, trusting local connections. It refuses to run as
    root, so as root it runs as the `postgres` user, in a folder that user owns."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="lora-pipeline-pg-"))
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                        "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A new, empty database: each test gets its own instance."""
        import psycopg2

        name = f"dagster_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()
        return name


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """The local PostgreSQL server, started once for the session and stopped at its end."""
    bindir = _postgres_bin()
    if bindir is None:
        _install_postgres()
        bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin) and cannot be installed here "
                    "(apt-get install postgresql needs root); .ci/run installs it")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_home(tmp_path, postgres) -> Path:
    """A DAGSTER_HOME whose instance keeps runs, events and schedules in a fresh Postgres database,
    with one slot in the `gpu` pool, as on a machine with one GPU."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance = {
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_db": {
            "hostname": "127.0.0.1", "port": postgres.port, "username": PG_USER, "password": "",
            "db_name": postgres.create_database(),
            "scheme": "postgresql+psycopg2",  # SQLAlchemy 2.1's default driver is psycopg 3, not installed
        }}},
        "concurrency": {"pools": {"default_limit": 1}},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    return home


def _cli_env(tmp_path: Path, home: Path) -> dict:
    return {**os.environ, "DAGSTER_HOME": str(home), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}


def _cli(tmp_path: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_pipeline.cli", *args], cwd=REPO, env=_cli_env(tmp_path, home),
                          capture_output=True, text=True, timeout=600)


def _instance(home: Path):
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def test_the_cli_runs_against_a_postgres_instance_and_its_runs_live_there(tmp_path, postgres_home):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    import dagster as dg

    done = _cli(tmp_path, postgres_home, "run", "configs/tiny-demo.yaml", "--select", "raw_dataset,formatted_dataset",
                "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["assets"]) == {"raw_dataset", "formatted_dataset"}
    with _instance(postgres_home) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        run = instance.get_run_by_id(summary["run_id"])
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        for asset in ("raw_dataset", "formatted_dataset"):
            latest = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert latest is not None and latest.run_id == summary["run_id"]
    # Run again: the instance in Postgres remembers what is materialized, so nothing is redone.
    again = _cli(tmp_path, postgres_home, "run", "configs/tiny-demo.yaml", "--select", "raw_dataset,formatted_dataset",
                 "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(json.loads(again.stdout.strip().splitlines()[-1])["up_to_date"]) == ["formatted_dataset", "raw_dataset"]


def test_the_production_instance_storage_connects_to_postgres(tmp_path, postgres, monkeypatch):
    """deploy/dagster.yaml's storage section, given this server through its DAGSTER_PG_* variables."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    for name, value in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_USERNAME": PG_USER, "DAGSTER_PG_PASSWORD": "",
                        "DAGSTER_PG_DB": postgres.create_database()}.items():
        monkeypatch.setenv(name, value)
    deployed = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    deployed["storage"]["postgres"]["postgres_db"]["port"] = postgres.port  # 5432 in a cluster
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"storage": deployed["storage"],
                                                           "concurrency": deployed["concurrency"]}))
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path))) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_runs(limit=1) == []
        assert instance.event_log_storage.get_pool_config().default_pool_limit == 4


@pytest.mark.slow
def test_two_concurrent_cli_runs_share_postgres_and_take_turns_in_the_gpu_pool(tmp_path, postgres_home, write_config):
    """Two models launched at once on one Postgres instance: both succeed, and their quantized_base
    steps (the `gpu` pool, one slot) never overlap."""
    configs = [write_config("alpha", training={"seed": 1}), write_config("beta", lora={"r": 4})]
    select = "raw_dataset,formatted_dataset,quantized_base"
    runs = [
        subprocess.Popen([sys.executable, "-m", "lora_pipeline.cli", "run", str(path), "--select", select, "--json"],
                         cwd=REPO, env=_cli_env(tmp_path, postgres_home), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for path in configs
    ]
    run_ids = []
    for process in runs:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        run_ids.append(json.loads(out.strip().splitlines()[-1])["run_id"])
    busy = [_step_interval(postgres_home, run_id, "quantized_base") for run_id in run_ids]
    (start_a, end_a), (start_b, end_b) = busy
    assert end_a <= start_b or end_b <= start_a, busy
    with _instance(postgres_home) as instance:
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert gpu.slot_count == 1 and not gpu.claimed_slots and not gpu.pending_steps  # all slots given back


def _step_interval(home: Path, run_id: str, step: str) -> tuple[float, float]:
    """When a run's step started and succeeded, from the instance's event log in Postgres."""
    times = {}
    with _instance(home) as instance:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is not None and event.step_key == step and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
                times[event.event_type_value] = entry.timestamp
    assert set(times) == {"STEP_START", "STEP_SUCCESS"}, times
    return times["STEP_START"], times["STEP_SUCCESS"]

"""Files users rely on outside the package: docker-compose.yml, migrations, the install layout."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeq.store import schema as db

ROOT = Path(__file__).resolve().parents[1]


def test_compose_has_the_services_and_redis_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["command"][0] == "worker"


def docker_extras() -> set[str]:
    """The extras of the project the Dockerfile installs (``pip install ".[a,b]"``)."""
    installs = re.findall(r'pip install "\.\[([^\]]*)\]"', (ROOT / "Dockerfile").read_text())
    assert len(installs) == 1, installs
    return {extra.strip() for extra in installs[0].split(",")}


def test_docker_image_installs_what_metrics_and_html_reports_import() -> None:
    # `pipeq worker --metrics-port` imports prometheus_client, `pipeq report --html` matplotlib: both
    # come from extras, so the image must install those extras or the flags fail inside it.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = docker_extras()
    assert installed <= set(extras), installed - set(extras)
    assert {"metrics", "report"} <= installed
    requirements = " ".join(req for name in installed for req in extras[name])
    assert "prometheus-client" in requirements and "matplotlib" in requirements


def test_compose_worker_serves_metrics_and_flower_is_published() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    command = services["worker"]["command"]
    port = command[command.index("--metrics-port") + 1]
    assert f"{port}:{port}" in services["worker"]["ports"] and port in services["worker"]["expose"]
    assert "5555:5555" in services["flower"]["ports"]
    assert "--port=5555" in services["flower"]["command"]


def test_migrations_are_found_and_reach_head(tmp_path: Path) -> None:
    assert (db.migrations_dir() / "env.py").is_file()
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    db.downgrade(url, "base")
    db.upgrade(url)


def test_only_the_pipeq_package_is_installed() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["pipeq"]
    assert project["project"]["scripts"] == {"pipeq": "pipeq.cli:main"}


def test_migrations_build_exactly_the_models(store_url: str) -> None:
    # The store fixtures are migrated with Alembic: nothing may differ from the SQLAlchemy models.
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pipeq.models import Base

    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def documented_grant() -> tuple[list[str], list[str], list[str]]:
    """The least-privilege PostgreSQL role of docs/operations.md: (privileges, tables, tables whose id sequence)."""
    text = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    m = re.search(r"a role granted `([^`]+)` on `([^`]+)` and `USAGE` on the (.+?) id sequences", text)
    assert m, "the PostgreSQL part of docs/operations.md names the grants of pipeq's role"
    privileges, tables = ([name.strip() for name in group.split(",")] for group in (m[1], m[2]))
    return privileges, tables, re.findall(r"`(\w+)`", m[3])


def test_documented_grants_cover_every_table_and_sequence_pipeq_uses() -> None:
    from pipeq.models import Base

    privileges, tables, sequences = documented_grant()
    assert privileges == ["SELECT", "INSERT", "UPDATE"]
    assert sorted(tables) == sorted(Base.metadata.tables), "every table of the models, nothing else"
    serial = [t.name for t in Base.metadata.sorted_tables if t.autoincrement_column is not None]
    assert sorted(sequences) == sorted(serial), "every table with an id sequence"


@pytest.fixture
def documented_role_url(pg_url: str) -> Iterator[str]:
    """The URL of a role with exactly the documented grants, on a database its owner migrated; dropped afterwards."""
    import sqlalchemy as sa

    privileges, tables, sequences = documented_grant()
    role = f"pipeq_app_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'GRANT {", ".join(privileges)} ON TABLE {", ".join(tables)} TO "{role}"'))
        for table in sequences:
            seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one()
            conn.execute(sa.text(f'GRANT USAGE ON SEQUENCE {seq} TO "{role}"'))
    yield pg_url.replace("postgres@", f"{role}@")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
        conn.execute(sa.text(f'DROP ROLE "{role}"'))
    admin.dispose()


def test_the_documented_role_is_enough_to_run_jobs(
    documented_role_url: str, pg_url: str, model_dir: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    from pipeq import Client, Settings
    from pipeq.routing import ServeKey
    from pipeq.worker.config import WorkerConfig
    from pipeq.worker.context import WorkerContext

    settings = Settings(broker_url="memory://", database_url=documented_role_url)
    task, model = "text-classification", model_dir("text-classification")
    texts = ["good", "bad", "我非常讨厌这个！"]
    ctx = WorkerContext(settings, WorkerConfig(key=ServeKey(task, model), max_batch_size=4, warmup=False))
    try:
        ctx.start()
        with Client(settings) as client:
            monkeypatch.setattr(client._celery, "send_task", lambda name, **kw: None)
            # A job run twice with the result cache, a calibration, a cancelled job: all as the role
            for _ in range(2):
                job = client.submit(texts, task=task, model=model, precision="fp32", cache=True)
                ctx.run_chunk(job.id, [[i, t] for i, t in enumerate(texts)], None)
                assert job.status().done == len(texts) and len(list(job.results())) == len(texts)
            assert job.status().cache_hits == len(texts), "the second job was served from result_cache"
            client.store.save_calibration(
                {"task": task, "model": model, "revision": None, "precision": "fp32", "device": "cpu",
                 "device_name": "cpu", "max_batch_tokens": 1024, "items_per_s": 1.0, "sweep": {}}
            )  # fmt: skip
            assert client.store.latest_calibration(
                task=task, model=model, revision=None, precision="fp32", device="cpu", device_name="cpu"
            )
            assert client.submit(texts, task=task, model=model, precision="fp32").cancel() == len(texts)
    finally:
        ctx.stop()
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM workers WHERE stopped_at IS NOT NULL")).scalar_one() == 1
    engine.dispose()


def test_the_image_runs_as_a_user_who_can_write_the_compose_volumes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the image's processes do not run as root"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    writable = [v.split(":")[1] for v in compose["x-pipeq"]["volumes"] if not v.endswith(":ro")]
    for path in writable:
        assert re.search(rf"mkdir -p [^\n]*{re.escape(path)}", dockerfile), f"{path} is created in the image"
        assert re.search(rf"chown {users[-1]}:{users[-1]} [^\n]*{re.escape(path)}", dockerfile), f"{path} is owned"

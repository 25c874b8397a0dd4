"""Files users rely on outside the package: docker-compose.yml, migrations, the install layout."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeq import db

ROOT = Path(__file__).resolve().parents[1]


def test_compose_has_the_services_and_redis_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "noeviction"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["command"][0] == "worker"


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

"""docker-compose.yml and the Dockerfile, checked for structure (no Docker engine runs here): the services a
team needs, one shared environment, PostgreSQL's health check gating the app and the workers, GPU workers that
scale."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_share_one_database_and_data_directory():
    services = compose()["services"]
    assert set(services) == {"postgres", "app", "worker"}
    urls = {name: services[name]["environment"]["RANA_DB_URL"] for name in ("app", "worker")}
    assert len(set(urls.values())) == 1
    url = urls["app"]
    assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    pg_env = services["postgres"]["environment"]
    assert url.endswith(f"/{pg_env['POSTGRES_DB']}") and f"//{pg_env['POSTGRES_USER']}:" in url
    for name in ("app", "worker"):
        assert services[name]["environment"]["RANA_DATA_DIR"] == "/data"
        assert "rana-data:/data" in services[name]["volumes"]  # artifacts made by a worker are readable by all
        assert services[name]["build"] == "."


def test_postgres_is_healthy_before_anything_starts_and_keeps_its_data():
    doc = compose()
    postgres = doc["services"]["postgres"]
    check = postgres["healthcheck"]
    assert "pg_isready" in " ".join(check["test"]) and check["retries"] >= 5
    assert any(v.startswith("pgdata:") for v in postgres["volumes"]) and "pgdata" in doc["volumes"]
    for name in ("app", "worker"):
        assert doc["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "rana db upgrade" in doc["services"]["app"]["command"]  # one service migrates, before serving


def test_workers_reserve_a_gpu_and_can_be_scaled():
    worker = compose()["services"]["worker"]
    assert worker["environment"]["RANA_DEVICE"].startswith("cuda")
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "ports" not in worker and "container_name" not in worker  # either would stop --scale worker=N
    assert worker["command"].split()[:2] == ["rana", "worker"]


def test_the_image_installs_the_project_the_way_make_does():
    text = (ROOT / "Dockerfile").read_text()
    assert "RUN make setup" in text and "RANA_GIT_SHA" in text
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    folders = [pattern.rstrip("*") for pattern in packages["include"]]
    assert "rana_cli" in folders  # the `rana` script's package
    for folder in (*folders, "scripts"):
        assert f"COPY {folder} ./{folder}" in text


def test_team_deployment_is_closed_by_default_and_holds_no_secret():
    """Team mode in compose: the app signs users in, only its port is published, and both secrets come from the
    environment (.env, which git ignores; .env.example documents them with placeholders)."""
    services = compose()["services"]
    assert [name for name, service in services.items() if "ports" in service] == ["app"]
    app = services["app"]
    assert app["environment"]["RANA_AUTH"] == "team"
    secrets = {"RANA_SESSION_SECRET": app["environment"]["RANA_SESSION_SECRET"],
               "POSTGRES_PASSWORD": services["postgres"]["environment"]["POSTGRES_PASSWORD"]}
    for name, value in secrets.items():  # required from the environment: compose refuses to start without them
        assert value.startswith("${" + name + ":?") and value.endswith("}"), value
    assert "${POSTGRES_PASSWORD:?" in app["environment"]["RANA_DB_URL"]
    text = (ROOT / "docker-compose.yml").read_text()
    assert "rana:rana@" not in text and "PASSWORD: rana" not in text
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == set(secrets) and all(v.startswith("replace-me") for v in example.values())
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()

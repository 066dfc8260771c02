"""The deployment files: docker-compose.yml validates with Debian's docker-compose (every profile), and holds what
DEPLOY.md promises (Redis AOF + noeviction, healthchecks, start order, a one-shot migration, a GPU reservation), and
every kiln setting it sets is one kiln reads. No Docker daemon is needed: `docker-compose config` works without one."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROFILES = ["gpu", "s3"]
# Services that run and exit; every other service is long-running and must report its health.
ONE_SHOT = {"migrate", "minio-bucket"}
KILN_SERVICES = {"migrate", "api", "worker", "predictor", "worker-gpu"}
WORKERS = {"worker", "predictor", "worker-gpu"}
# KILN_* variables that Compose reads to fill in the file, not kiln settings.
COMPOSE_ONLY = {"KILN_API_WORKERS", "KILN_API_PUBLISH"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the `<<: *kiln` merge keys


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


# ---- docker-compose config ----------------------------------------------------------------------------------


def _docker_compose(*args: str, api_key: str | None = "ci-dummy-key", tmp_path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed; CI installs Debian's: sudo apt-get install -y docker-compose")
    # Only what this test sets: no KILN_*, AWS_*, POSTGRES_* or REDIS_* from the caller, and an empty env file in
    # place of a developer's .env beside the compose file.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "AWS_", "POSTGRES_", "REDIS_", "COMPOSE_"))}
    if api_key is not None:
        env["KILN_API_KEY"] = api_key
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["s3"], PROFILES], ids=["default", "gpu", "s3", "all"])
def test_docker_compose_config_validates(profiles, tmp_path):
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    done = _docker_compose(*flags, "config", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert KILN_SERVICES | {"postgres", "redis"} <= set(resolved["services"])
    api = resolved["services"]["api"]
    assert api["environment"]["KILN_API_KEY"] == "ci-dummy-key"
    assert "--workers=2" in _command(api)  # KILN_API_WORKERS' default
    assert "KILN_API_KEY" not in resolved["services"]["worker"]["environment"]  # workers never need the API key


def test_docker_compose_config_refuses_a_missing_api_key(tmp_path):
    done = _docker_compose("config", "-q", api_key=None, tmp_path=tmp_path)
    assert done.returncode != 0
    assert "KILN_API_KEY" in done.stderr


# ---- what the file holds --------------------------------------------------------------------------------------


def test_every_kiln_variable_is_a_kiln_setting(services):
    """Settings ignores unknown KILN_* variables, so a typo here would silently change nothing."""
    checked = 0
    for name, service in services.items():
        for variable in _environment(service):
            if variable.startswith("KILN_"):
                field = variable.removeprefix("KILN_").lower()
                assert field in Settings.model_fields, f"{name}: {variable} is not a field of kiln.settings.Settings"
                checked += 1
    assert checked >= len(KILN_SERVICES) * 3


def test_every_kiln_variable_deploy_md_names_exists():
    text = COMPOSE_FILE.read_text()
    for variable in sorted(set(re.findall(r"\bKILN_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "DEPLOY.md").read_text()))):
        if variable in COMPOSE_ONLY:
            assert "${" + variable in text, f"DEPLOY.md names {variable}, which docker-compose.yml does not read"
        else:
            assert variable.removeprefix("KILN_").lower() in Settings.model_fields, f"DEPLOY.md: {variable} is no setting"


def test_each_password_is_set_in_one_place(services):
    """The server and the URLs kiln connects with read the same Compose variable."""
    kiln_env = _environment(services["api"])
    assert "${POSTGRES_PASSWORD:-kiln}@postgres:5432" in kiln_env["KILN_DATABASE_URL"]
    assert _environment(services["postgres"])["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-kiln}"
    assert kiln_env["KILN_BROKER_URL"] == "redis://:${REDIS_PASSWORD:-}@redis:6379/0"
    redis_command = _command(services["redis"])
    assert redis_command[redis_command.index("--requirepass") + 1] == "${REDIS_PASSWORD:-}"


def test_redis_keeps_its_queue_across_restarts_and_never_evicts(services):
    redis = services["redis"]
    command = _command(redis)
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_postgres_keeps_its_data_in_a_volume(compose, services):
    volumes = services["postgres"]["volumes"]
    assert any(v.split(":", 1) == ["pgdata", "/var/lib/postgresql/data"] for v in volumes)
    assert "pgdata" in compose["volumes"]


def test_every_long_running_service_has_a_healthcheck(services):
    assert {"postgres", "redis", "api", "worker", "predictor", "worker-gpu"} <= set(services) - ONE_SHOT
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in WORKERS:  # the worker registry's heartbeat, as GET /v1/workers reports it
        assert services[name]["healthcheck"]["test"] == ["CMD", "kiln", "worker-health"], name


def test_migrate_runs_once_before_everything_that_uses_the_database(services):
    migrate = services["migrate"]
    assert _command(migrate) == ["kiln", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in KILN_SERVICES - {"migrate"}:
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
            assert rule["condition"] in {"service_healthy", "service_completed_successfully"}, name
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
            else:
                assert dependency in ONE_SHOT, name


def test_the_api_runs_several_processes_and_needs_the_key(services):
    api = services["api"]
    command = _command(api)
    assert command[:3] == ["uvicorn", "api.app:create_app", "--factory"]
    assert "--workers=${KILN_API_WORKERS:-2}" in command
    assert _environment(api)["KILN_API_KEY"].startswith("${KILN_API_KEY:?")


def test_workers_run_kiln_worker_and_have_time_to_hand_jobs_back(services):
    for name in WORKERS:
        service = services[name]
        assert _command(service)[:2] == ["kiln", "worker"], name
        assert service.get("init") is True, name  # reaps the processes `kiln worker` starts, forwards SIGTERM
        grace = service["stop_grace_period"]
        seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
        assert seconds >= 30, name
    assert "--role" in _command(services["predictor"])


def test_the_gpu_worker_reserves_nvidia_devices(services):
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # One process per GPU it is given, on kiln.gpu; no GPU in the container is an error, not a CPU worker.
    assert _command(gpu) == ["kiln", "worker", "--gpus", "all"]
    assert "--gpus" in _command(services["worker"]) and "none" in _command(services["worker"])
    assert "TORCH_INDEX_URL" in gpu["build"]["args"]  # the CUDA build of torch
    assert gpu["image"] != services["worker"]["image"]


def test_optional_services_stay_out_of_the_default_start(services):
    """`docker compose up` without a profile starts what kiln needs on one host, and nothing depends on a profile."""
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == {"postgres", "redis", "migrate", "api", "worker", "predictor"}
    for name in default:
        assert set(services[name].get("depends_on") or {}) <= default, name


def test_the_image_pins_torch_as_bootstrap_does():
    dockerfile = (ROOT / "Dockerfile").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pinned = re.search(r"KILN_TORCH_VERSION:-([0-9.]+)", bootstrap).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", dockerfile, re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile  # CPU by default
    assert dockerfile.index('"torch==$TORCH_VERSION"') < dockerfile.index("pip install '.[")  # torch first
    assert re.search(r"^USER (?!root)", dockerfile, re.M)

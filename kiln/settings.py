"""One Settings object for every kiln process, read from KILN_* environment variables.

It refuses bad configuration at start rather than failing on the first request.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".kiln"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    # Where embedded state lives: SQLite database, artifacts, the generated API key.
    data_dir: Path = Field(default_factory=default_data_dir)
    # SQLAlchemy URL; empty means SQLite under data_dir.
    database_url: str = ""
    # Celery broker (Redis) URL; `kiln up` starts an embedded server and fills this in.
    broker_url: str = ""
    # Local artifact store; empty means data_dir/artifacts.
    artifacts_dir: Path | None = None
    # S3-compatible object storage for artifacts instead of artifacts_dir, used when s3_bucket is set: then the
    # API and the workers share no filesystem. Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID and
    # AWS_SECRET_ACCESS_KEY, a profile, an instance role), never from here. s3_prefix: a key prefix ("kiln/prod");
    # s3_endpoint_url: another server than AWS (MinIO, R2, moto); s3_region: empty means boto3's default.
    s3_bucket: str = Field(default="", pattern=r"^([A-Za-z0-9][A-Za-z0-9._\-]{1,61}[A-Za-z0-9])?$")
    s3_prefix: str = ""
    s3_endpoint_url: str = Field(default="", pattern=r"^(https?://\S+)?$")
    s3_region: str = Field(default="", pattern=r"^[a-z0-9\-]*$")
    # The single API key of this deployment; empty means the key file under data_dir.
    api_key: SecretStr = SecretStr("")
    # Celery queue that CPU jobs are sent to, and the prefix of the others (.gpu, .auto, .predict, .<pool>).
    queue: str = Field(default="kiln", pattern=r"^[A-Za-z0-9_.\-]{1,64}$")

    # Worker leases: a running job whose lease is not renewed for lease_s is considered lost.
    # With the reconciler's interval, this bounds how soon a lost job is dispatched again.
    lease_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0)
    # Attempts a job gets before "worker lost N times; giving up".
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Redis redelivers an unacknowledged message after this long. The claim makes an early redelivery
    # harmless, but each one costs a wasted delivery, so keep it above typical job durations.
    visibility_timeout_s: int = Field(default=48 * 3600, ge=1)
    # The reconciler (run by the API): publishes jobs left in the outbox, re-dispatches jobs whose
    # lease expired, and republishes queued jobs whose message the broker lost (restart, FLUSHALL).
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    outbox_grace_s: float = Field(default=5.0, ge=0)
    lost_message_grace_s: float = Field(default=30.0, ge=0)

    # Per-job wall-clock limits: the default for specs that set none, and the most a spec may ask.
    default_time_limit_s: int = Field(default=24 * 3600, ge=1)
    max_time_limit_s: int = Field(default=7 * 24 * 3600, ge=1)

    # Worker processes per `kiln worker`; torch threads per process are the cores divided by this.
    worker_concurrency: int = Field(default=1, ge=1, le=256)

    # How long the API waits for a predictor worker's answer before a 503.
    predict_timeout_s: float = Field(default=10.0, gt=0, le=300)

    # "json": one JSON object per log line, with the job's id on every line logged while a job runs.
    log_format: Literal["text", "json"] = "text"

    # Per-owner bounds, checked before anything is queued: jobs queued or running at once; parameters a model
    # may have (computed from the spec, nothing allocated); rows a job may train on in all (epochs x rows).
    max_active_jobs: int = Field(default=20, ge=1)
    max_parameters: int = Field(default=25_000_000, ge=1)
    max_epoch_rows: int = Field(default=500_000_000, ge=1)

    # Largest request body the API reads.
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Largest dataset upload (POST /v1/datasets), and the most an uploaded NPZ's arrays may take uncompressed.
    max_upload_bytes: int = Field(default=50 << 20, ge=1024)

    @field_validator("database_url", "broker_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("s3_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("/") or ".." in value or not value.isprintable() or len(value) > 512:
            raise ValueError(f"KILN_S3_PREFIX {value!r} must be printable, relative (no leading /) and without '..'")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> "Settings":
        if self.heartbeat_s * 3 > self.lease_s:
            raise ValueError(
                f"KILN_HEARTBEAT_S ({self.heartbeat_s}) must be at most a third of KILN_LEASE_S ({self.lease_s}), "
                "or one slow heartbeat would make a running job look lost"
            )
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'kiln.db'}"

    @property
    def artifacts_path(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    def resolved_api_key(self) -> str:
        """The configured key, else the one `kiln up` wrote under data_dir, else empty."""
        if key := self.api_key.get_secret_value():
            return key
        try:
            return self.api_key_file.read_text().strip()
        except FileNotFoundError:
            return ""


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""The service's settings, read from `ENRICH_*` environment variables (`__` nests).

Secrets (the broker and database passwords, S3 keys) come from the environment only:
S3 credentials through boto3's own chain (`AWS_ACCESS_KEY_ID`, a role, ...), never from here.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]


class Stage(StrEnum):
    """The model stages of an enrichment (the image embedding comes from the tagging pass)."""

    SEGMENTATION = "segmentation"
    TAGGING = "tagging"
    EMBEDDING = "embedding"


class SegmentationBackend(StrEnum):
    TORCHVISION = "torchvision"
    DETECTRON2 = "detectron2"


class EmbeddingPooling(StrEnum):
    """How the embedding stage turns token vectors into one text vector."""

    MEAN_LAST_LAYER = "mean_last_layer"
    SENTENCE_TRANSFORMERS = "sentence_transformers"


class ModelSettings(BaseModel):
    segmentation_backend: SegmentationBackend = SegmentationBackend.TORCHVISION
    segmenter_dir: Path = REPO_ROOT / "models" / "segmenter"
    tagger_dir: Path = REPO_ROOT / "models" / "tagger"
    embedding_dir: Path | None = Field(
        default=None,
        description="A transformers model folder; unset means the packaged all-MiniLM-L6-v2.",
    )
    embedding_pooling: EmbeddingPooling = Field(
        default=EmbeddingPooling.SENTENCE_TRANSFORMERS,
        description="sentence_transformers: the folder's own pooling (modules.json); "
        "mean_last_layer: the mean of the last layer's token vectors, for any folder.",
    )
    embedding_window_overlap: int = Field(
        default=32,
        ge=0,
        description="Tokens shared by consecutive windows of a text longer than the encoder's "
        "limit.",
    )
    device: str | None = Field(default=None, description="cuda, cuda:1 or cpu; unset picks CUDA.")
    mask_score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Overrides the segmenter's own threshold."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads one model call may use on the CPU (torch.set_num_threads); unset "
        "keeps torch's default, one per core. With --pool threads the three stages' model "
        "threads already run side by side: 1 was fastest on 2 cores (docs/sizing.md).",
    )


class S3Settings(BaseModel):
    endpoint_url: str | None = Field(default=None, description="Unset means AWS itself.")
    region: str = "us-east-1"
    mask_bucket: str = "enrichment-masks"
    image_buckets: list[str] = Field(
        default_factory=list, description="Buckets images may be read from; empty allows any."
    )
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0


class ImageSettings(BaseModel):
    https_hosts: list[str] = Field(
        default_factory=list, description="Hosts https image URLs may name; empty allows none."
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDR blocks an image host may resolve to although private or loopback "
        "(an internal CDN; 127.0.0.1/32 in tests). Cloud metadata addresses are never allowed.",
    )
    ca_bundle: Path | None = Field(
        default=None, description="CA certificates for https image hosts; unset means the system's."
    )
    max_redirects: int = Field(default=3, ge=0)
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    timeout_s: float = Field(default=20.0, gt=0, description="Limit on one whole download.")


RETRY_COUNTDOWN_MAX_S = 300.0
"""The longest retry countdown (worker.tasks.backoff_s); Celery holds a retried task's message
unacknowledged during its countdown."""


class BatchSettings(BaseModel):
    """Batches of the model stages, formed across the events one worker process runs at once,
    and the limits that keep every message below RabbitMQ's consumer timeout."""

    max_size: int = Field(
        default=8, ge=1, le=256, description="Images or texts per model call, across events."
    )
    max_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=10_000,
        description="How long the oldest item waits for a batch to fill before it runs.",
    )
    mixed_precision: bool = Field(
        default=True, description="float16 autocast on CUDA; CPU stages always run float32."
    )
    full_precision_stages: list[Stage] = Field(
        default_factory=lambda: [Stage.TAGGING],
        description="Stages that stay float32 under mixed precision, where `enrich bench "
        "precision` finds that float16 moves their results. Tagging by default: in float16 "
        "its scores, which sit near the per-label thresholds, flip labels on about a third of "
        "the photos (docs/benchmarks.md).",
    )
    task_time_limit_s: float = Field(
        default=900.0,
        gt=0,
        description="A task still running after this long stops waiting for its batches and "
        "is retried (Celery's soft time limit under prefork).",
    )
    consumer_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="RabbitMQ's consumer_timeout, which closes a channel holding a message "
        "unacknowledged for longer; checked against the limits above.",
    )

    @model_validator(mode="after")
    def _fits_the_consumer_timeout(self) -> BatchSettings:
        if self.max_wait_ms / 1000 >= self.task_time_limit_s:
            raise ValueError(
                f"ENRICH_BATCH__MAX_WAIT_MS {self.max_wait_ms:g} ms must be shorter than "
                f"ENRICH_BATCH__TASK_TIME_LIMIT_S {self.task_time_limit_s:g} s, or no batch "
                "could run within a task's time"
            )
        longest_s = self.longest_unacked_s()
        if longest_s >= self.consumer_timeout_s:
            raise ValueError(
                f"a task message could stay unacknowledged {longest_s:g} s (a retry's "
                f"countdown of up to {RETRY_COUNTDOWN_MAX_S:g} s, then "
                f"ENRICH_BATCH__TASK_TIME_LIMIT_S {self.task_time_limit_s:g} s), which is not "
                f"below ENRICH_BATCH__CONSUMER_TIMEOUT_S {self.consumer_timeout_s:g} s: "
                "RabbitMQ would close the channel. Lower the time limit or raise the broker's "
                "consumer_timeout (and this setting with it)"
            )
        return self

    def mixed_for(self, stage: Stage) -> bool:
        """Whether `stage` runs under mixed precision (on CUDA; CPU runs float32)."""
        return self.mixed_precision and stage not in self.full_precision_stages

    def longest_unacked_s(self) -> float:
        """The longest a task message can stay unacknowledged: a retry's countdown, during
        which Celery holds it, then a run up to the time limit, batch waits included."""
        return RETRY_COUNTDOWN_MAX_S + self.task_time_limit_s


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENRICH_", env_nested_delimiter="__", extra="ignore"
    )

    broker_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672//")
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/enrichment")
    exchange: str = Field(default="catalog", description="Topic exchange events travel on.")
    intake_queue: str = "enrichment.product_created"
    task_queue: str = "enrichment.tasks"
    dead_letter_queue: str = "enrichment.dead_letter"
    backfill_queue: str = Field(
        default="enrichment.backfill",
        description="Celery's queue of backfilled enrichment tasks, apart from uploads' tasks.",
    )
    backfill_slice_s: float = Field(
        default=10.0,
        gt=0,
        description="How long one enrichment.start_backfill task submits before it hands the "
        "rest of the run to a new task, so that a worker process is not held by a long run.",
    )
    models: ModelSettings = Field(default_factory=ModelSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    log_json: bool | None = Field(default=None, description="Unset means JSON off a terminal.")
    log_level: str = "INFO"
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address of /metrics and /healthz/*; 0.0.0.0 in a container.",
    )
    metrics_port: int = Field(
        default=9540, ge=0, le=65535, description="Port of /metrics and /healthz/*; 0 is off."
    )
    metrics_dir: Path | None = Field(
        default=None,
        description="Folder of the pool processes' metric files; unset means a new temporary one.",
    )
    liveness_stall_s: float = Field(
        default=300.0,
        gt=0,
        description="Messages waiting and no progress for this long: the worker is not live.",
    )
    health_timeout_s: float = Field(
        default=3.0, gt=0, description="Timeout of each broker and database check."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

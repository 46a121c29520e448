"""The models, loaded once per worker process, after the fork, under a lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from handlers.base import ModelLoadError, Stage
from handlers.embedding import TextEmbedder, default_embedding_model_dir
from handlers.image_embedding import ImageEmbedder
from handlers.segmentation import Segmenter, load_segmenter
from handlers.tagging import Tagger
from schemas.events import ModelVersions
from schemas.settings import ModelSettings, SegmentationBackend

_lock = threading.Lock()
_loaded: Models | None = None


MODEL_STAGES = {
    "segmenter": Stage.SEGMENTATION,
    "tagger": Stage.TAGGING,
    "embedder": Stage.EMBEDDING,
    "image_embedder": Stage.TAGGING,
}
"""The stage each field of `Models` serves (image vectors come from the tagging pass)."""


@dataclass(frozen=True)
class Models:
    segmenter: Segmenter
    tagger: Tagger
    embedder: TextEmbedder
    image_embedder: ImageEmbedder
    """Reads the tagger's backbone: enrichment gets its vectors from `tagger.tag_and_embed`."""

    @property
    def versions(self) -> ModelVersions:
        return ModelVersions(
            segmentation=self.segmenter.model_version,
            tagging=self.tagger.model_version,
            embedding=self.embedder.model_version,
            image_embedding=self.image_embedder.model_version,
        )


def load_models(settings: ModelSettings) -> Models:
    """Load every stage's model from its folder; each stage logs its own load.

    Every failure is a ModelLoadError, so that the worker stops and hands its message back
    instead of taking events it cannot enrich: a stage names its own faults, and anything
    else (no CUDA driver for ENRICH_MODELS__DEVICE=cuda, an unknown device) is wrapped here.
    """
    try:
        return _load_models(settings)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the models with ENRICH_MODELS__DEVICE={settings.device or '(unset)'}: "
            f"{exc!r}"
        ) from exc


def _load_models(settings: ModelSettings) -> Models:
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)

    segmenter = load_segmenter(
        settings.segmentation_backend,
        settings.segmenter_dir,
        device=settings.device,
        score_threshold=settings.mask_score_threshold,
    )
    tagger = Tagger(model_dir=settings.tagger_dir, device=settings.device)
    embedder = TextEmbedder.from_settings(settings)

    return Models(
        segmenter=segmenter, tagger=tagger, embedder=embedder, image_embedder=ImageEmbedder(tagger)
    )


def missing_model_folders(settings: ModelSettings) -> list[str]:
    """Model folders that do not exist, checked in the parent before any process forks."""
    folders = {
        "ENRICH_MODELS__SEGMENTER_DIR": settings.segmenter_dir,
        "ENRICH_MODELS__TAGGER_DIR": settings.tagger_dir,
        "ENRICH_MODELS__EMBEDDING_DIR": settings.embedding_dir or default_embedding_model_dir(),
    }
    return [f"{name}={path}" for name, path in folders.items() if not path.is_dir()]


def get_models(settings: ModelSettings) -> Models:
    """This process's models, loading them on first use."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = load_models(settings)
        return _loaded


def current_model_versions(settings: ModelSettings) -> ModelVersions:
    """The versions `load_models(settings).versions` gives, loading no model: each stage's
    name comes from its folder's config as the stage reads it, and the hash from the files.

    Backfills compare these with the enrichments' versions (`--stale`) without a model's
    memory or load time.
    """
    from handlers.base import model_version
    from handlers.embedding import _model_id as embedding_model_id
    from handlers.embedding import read_pooling
    from handlers.image_embedding import image_embedding_version
    from handlers.tagging import CONFIG_FILE, TaggerConfig

    if settings.segmentation_backend == SegmentationBackend.DETECTRON2:
        from handlers.detectron2_backend import read_config
    else:
        from handlers.torchvision_backend import read_config  # type: ignore[assignment]
    segmenter_name = read_config(settings.segmenter_dir).name
    tagger_name = TaggerConfig.read(settings.tagger_dir / CONFIG_FILE).name
    embedding_dir = settings.embedding_dir or default_embedding_model_dir()
    pooling = read_pooling(settings.embedding_pooling, embedding_dir)

    tagging = model_version(tagger_name, settings.tagger_dir)

    return ModelVersions(
        segmentation=model_version(segmenter_name, settings.segmenter_dir),
        tagging=tagging,
        embedding=model_version(
            f"{embedding_model_id(embedding_dir)}:{pooling.name}", embedding_dir
        ),
        image_embedding=image_embedding_version(tagging),
    )

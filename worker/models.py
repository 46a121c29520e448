"""The three models, loaded once per worker process, after the fork, under a lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from handlers.embedding import TextEmbedder, default_embedding_model_dir
from handlers.segmentation import Segmenter, load_segmenter
from handlers.tagging import Tagger
from schemas.events import ModelVersions
from schemas.settings import ModelSettings

_lock = threading.Lock()
_loaded: Models | None = None


@dataclass(frozen=True)
class Models:
    segmenter: Segmenter
    tagger: Tagger
    embedder: TextEmbedder

    @property
    def versions(self) -> ModelVersions:
        return ModelVersions(
            segmentation=self.segmenter.model_version,
            tagging=self.tagger.model_version,
            embedding=self.embedder.model_version,
        )


def load_models(settings: ModelSettings) -> Models:
    """Load every stage's model from its folder; each stage logs its own load."""
    segmenter = load_segmenter(
        settings.segmentation_backend,
        settings.segmenter_dir,
        device=settings.device,
        score_threshold=settings.mask_score_threshold,
    )
    tagger = Tagger(model_dir=settings.tagger_dir, device=settings.device)
    embedder = TextEmbedder.from_settings(settings)

    return Models(segmenter=segmenter, tagger=tagger, embedder=embedder)


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

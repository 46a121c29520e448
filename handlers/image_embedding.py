"""The image-embedding stage: one unit vector per photo, for visual similarity.

The vector is the tagger's pooled backbone features (EfficientNet-Lite0's last feature map,
averaged over space: 1280-d), computed in the tagger's own forward pass, so visual
similarity needs no model beyond the three the worker loads anyway. Its model version is the
tagger's plus a suffix naming the pooling, so that a retrained tagger, or another pooling,
is a new embedding space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from handlers.base import RGBImage, Tags
from handlers.tagging import Tagger

POOLING = "avgpool"
"""How a feature map becomes a vector; part of the model version."""


class ImageEmbedder:
    """Image embeddings (B, D) float32, unit rows, from a loaded tagger's backbone."""

    def __init__(self, tagger: Tagger) -> None:
        self.tagger = tagger
        self.model_version = image_embedding_version(tagger.model_version)
        self.dimension = tagger.feature_dimension

    @property
    def model_id(self) -> str:
        """The version without its hash: the tagger's name and the pooling."""
        return self.model_version.split("@", 1)[0] + "+" + POOLING

    def embed(self, images: Sequence[RGBImage]) -> npt.NDArray[np.float32]:
        """One unit-length row (D,) float32 per image; (0, D) for no images."""
        _, embeddings = self.tagger.tag_and_embed(images)
        return embeddings

    def tag_and_embed(
        self, images: Sequence[RGBImage]
    ) -> tuple[list[Tags], npt.NDArray[np.float32]]:
        """Tags and image embeddings (B, D) float32 from the tagger's single forward pass."""
        return self.tagger.tag_and_embed(images)


def image_embedding_version(tagger_version: str) -> str:
    """`name@hash` of the tagger gives `name@hash+avgpool`."""
    return f"{tagger_version}+{POOLING}"


def product_image_embedding(embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A product's vector (D,) float32: the mean of its photos' unit rows (B, D), normalised."""
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"expected (B, D) image embeddings with B >= 1, got {embeddings.shape}")
    mean: npt.NDArray[np.float64] = embeddings.astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        return np.zeros(embeddings.shape[1], dtype=np.float32)
    product: npt.NDArray[np.float32] = (mean / norm).astype(np.float32)
    return product

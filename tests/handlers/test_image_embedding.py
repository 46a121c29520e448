from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handlers.image_embedding import ImageEmbedder, product_image_embedding
from handlers.tagging import Tagger
from handlers.training.ccp import load_photo
from schemas.settings import REPO_ROOT

SHIPPED_TAGGER = REPO_ROOT / "models" / "tagger"


@pytest.fixture(scope="module")
def embedder() -> ImageEmbedder:
    return ImageEmbedder(Tagger(model_dir=SHIPPED_TAGGER, device="cpu"))


@pytest.fixture(scope="module")
def photos(datasets: Path) -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
    return [load_photo(datasets / "ccp", image_id) for image_id in (1940, 1945, 1950)]


def test_the_image_embedding_version_is_the_taggers_with_the_pooling(
    embedder: ImageEmbedder,
) -> None:
    version = embedder.model_version

    assert version == f"{embedder.tagger.model_version}+avgpool"
    assert embedder.dimension == 1280
    assert embedder.model_id == "ccp-tagger-efficientnet-lite0+avgpool"


def test_a_photo_is_nearer_to_its_mirror_image_than_to_other_photos(
    embedder: ImageEmbedder, photos: list[np.ndarray[Any, np.dtype[np.uint8]]]
) -> None:
    mirrored = np.ascontiguousarray(photos[0][:, ::-1])

    embeddings = embedder.embed([*photos, mirrored])

    similarities = embeddings @ embeddings[-1]
    assert embeddings.shape == (4, embedder.dimension)
    assert int(np.argmax(similarities[:-1])) == 0


def test_a_products_vector_is_the_normalised_mean_of_its_photos_vectors() -> None:
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)

    product = product_image_embedding(rows)

    np.testing.assert_allclose(product, [2**-0.5, 2**-0.5, 0.0], atol=1e-6)
    assert product.dtype == np.float32


def test_a_product_without_image_vectors_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        product_image_embedding(np.zeros((0, 3), dtype=np.float32))

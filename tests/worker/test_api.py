"""The similarity service over FastAPI's TestClient, against the stack's Postgres."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from handlers.embedding import TextEmbedder, default_embedding_model_dir
from tests.worker.catalog import add_products, catalog_database
from worker.api import create_app
from worker.local import LocalStack
from worker.stores import database

TITLES = {
    "jeans-slim": "Slim fit blue denim jeans",
    "jeans-wide": "Wide leg light wash denim jeans",
    "boots": "Brown leather ankle boots",
    "dress": "Red floral summer dress",
    "shirt": "White cotton oxford shirt",
}
IMAGE_VERSION = "tagger@1+avgpool"
IMAGE_EMBEDDINGS = {  # by their photos, the boots look most like the wide jeans
    "jeans-slim": np.array([0.8, 0.6, 0.0], np.float32),
    "jeans-wide": np.array([0.6, 0.8, 0.0], np.float32),
    "boots": np.array([0.0, 1.0, 0.0], np.float32),
    "dress": np.array([0.0, 0.0, 1.0], np.float32),
}
LABELS = {"jeans-slim": ["jeans", "slim"], "jeans-wide": ["jeans"], "boots": ["shoes"]}
ATTRIBUTES = {"jeans-slim": ["blue"], "jeans-wide": ["blue"], "shirt": ["white"]}


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder(model_dir=default_embedding_model_dir(), device="cpu")


@pytest.fixture(scope="module")
def client(stack: LocalStack, embedder: TextEmbedder) -> Iterator[TestClient]:
    embeddings = dict(zip(TITLES, embedder.embed(list(TITLES.values())), strict=True))
    with catalog_database(stack) as url:
        with database.connect(url) as conn:
            add_products(
                conn, embedder.model_version, embeddings, labels=LABELS, attributes=ATTRIBUTES
            )
            add_products(conn, IMAGE_VERSION, IMAGE_EMBEDDINGS, labels=LABELS, space="image")
        app = create_app(database_url=url, load_encoder=lambda: embedder)
        with TestClient(app) as test_client:
            yield test_client


def test_similar_to_a_product_ranks_the_other_jeans_first(client: TestClient) -> None:
    response = client.get("/products/jeans-slim/similar", params={"k": 2})

    assert response.status_code == 200
    body = response.json()
    assert [r["product_id"] for r in body["results"]][:1] == ["jeans-wide"]
    assert len(body["results"]) == 2


def test_search_by_text_embeds_the_query_in_the_products_space(
    client: TestClient, embedder: TextEmbedder
) -> None:
    response = client.get("/search", params={"q": "leather boots", "k": 1})

    assert response.status_code == 200
    assert response.json() == {
        "model_version": embedder.model_version,
        "space": "text",
        "results": [
            {
                "product_id": "boots",
                "title": "title of boots",
                "distance": pytest.approx(response.json()["results"][0]["distance"]),
                "model_version": embedder.model_version,
            }
        ],
    }


def test_filters_keep_only_products_with_all_labels_and_attributes(client: TestClient) -> None:
    response = client.get(
        "/search", params={"q": "trousers", "label": ["jeans", "slim"], "attribute": "blue"}
    )

    assert [r["product_id"] for r in response.json()["results"]] == ["jeans-slim"]


def test_an_unknown_product_is_404(client: TestClient) -> None:
    response = client.get("/products/nope/similar")

    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


def test_k_out_of_range_is_422(client: TestClient) -> None:
    response = client.get("/search", params={"q": "jeans", "k": 0})

    assert response.status_code == 422


def test_the_openapi_schema_has_both_paths(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()

    assert {"/products/{product_id}/similar", "/search"} <= set(schema["paths"])
    parameters = {p["name"] for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert {"q", "k", "label", "attribute", "model_version"} <= parameters


def test_similar_in_the_image_space_ranks_by_the_products_photos(client: TestClient) -> None:
    response = client.get("/products/boots/similar", params={"k": 2, "space": "image"})

    assert response.status_code == 200
    body = response.json()
    assert body["space"] == "image" and body["model_version"] == IMAGE_VERSION
    assert [r["product_id"] for r in body["results"]] == ["jeans-wide", "jeans-slim"]


def test_image_space_filters_keep_only_products_with_all_labels(client: TestClient) -> None:
    response = client.get(
        "/products/boots/similar", params={"space": "image", "label": ["jeans", "slim"]}
    )

    assert [r["product_id"] for r in response.json()["results"]] == ["jeans-slim"]


@pytest.mark.parametrize(
    ("path", "params"),
    [("/search", {"q": "boots", "space": "image"}), ("/products/boots/similar", {"space": "x"})],
    ids=["text search in the image space", "unknown space"],
)
def test_a_query_outside_the_spaces_it_can_search_is_422(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    response = client.get(path, params=params)

    assert response.status_code == 422

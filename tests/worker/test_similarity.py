"""Similarity queries against exact search on a synthetic catalog of random 384-d vectors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from schemas.queries import SimilarityQuery
from tests.worker.catalog import add_products, catalog_database, exact_nearest, random_embeddings
from worker import similarity
from worker.local import LocalStack
from worker.stores import database

VERSION = "minilm@1"
DIMENSION = 384
NUM_PRODUCTS = 3000
NUM_QUERIES = 25
EMBEDDINGS = random_embeddings(NUM_PRODUCTS, DIMENSION)
IDS = list(EMBEDDINGS)

# Label and attribute filters of known selectivity: every 5th product (20%), every 100th (1%).
LABELS = {pid: ["jeans", *(["slim"] if i % 5 == 0 else [])] for i, pid in enumerate(IDS)}
ATTRIBUTES = {pid: ["denim", *(["selvedge"] if i % 100 == 0 else [])] for i, pid in enumerate(IDS)}
SLIM = {pid: EMBEDDINGS[pid] for i, pid in enumerate(IDS) if i % 5 == 0}
SELVEDGE = {pid: EMBEDDINGS[pid] for i, pid in enumerate(IDS) if i % 100 == 0}


@pytest.fixture(scope="module")
def catalog(stack: LocalStack) -> Iterator[psycopg.Connection[Any]]:
    with catalog_database(stack) as url, database.connect(url) as conn:
        add_products(conn, VERSION, EMBEDDINGS, labels=LABELS, attributes=ATTRIBUTES)
        database.ensure_embedding_index(conn, VERSION, DIMENSION)
        conn.execute("ANALYZE")
        yield conn


def mean_recall(
    conn: psycopg.Connection[Any], matching: dict[str, np.ndarray], query: SimilarityQuery
) -> tuple[float, set[int]]:
    """Recall@k against exact search over `matching`, and the row counts seen, over queries
    by product for the first NUM_QUERIES products."""
    recalls, counts = [], set()
    for product_id in IDS[:NUM_QUERIES]:
        found = similarity.similar_to_product(conn, product_id, query)
        truth = exact_nearest(matching, EMBEDDINGS[product_id], query.k, exclude=product_id)
        recalls.append(len({r.product_id for r in found} & set(truth)) / len(truth))
        counts.add(len(found))
    return float(np.mean(recalls)), counts


def test_unfiltered_queries_match_exact_search(catalog: psycopg.Connection[Any]) -> None:
    query = SimilarityQuery(k=10, model_version=VERSION)

    recall, counts = mean_recall(catalog, EMBEDDINGS, query)

    print(f"\nrecall@10 unfiltered: {recall:.3f}")
    assert recall >= 0.9
    assert counts == {10}


def test_a_label_filter_passing_a_fifth_uses_the_index_and_keeps_recall(
    catalog: psycopg.Connection[Any],
) -> None:
    query = SimilarityQuery(k=10, labels=["jeans", "slim"], model_version=VERSION)

    recall, counts = mean_recall(catalog, SLIM, query)

    print(f"\nrecall@10 with a 20% label filter (iterative index scan): {recall:.3f}")
    assert recall >= 0.9
    assert counts == {10}


def test_an_attribute_filter_passing_one_percent_returns_k_exact_rows(
    catalog: psycopg.Connection[Any],
) -> None:
    query = SimilarityQuery(k=10, attributes=["selvedge"], model_version=VERSION)

    recall, counts = mean_recall(catalog, SELVEDGE, query)

    print(f"\nrecall@10 with a 1% attribute filter (exact fallback): {recall:.3f}")
    assert recall == 1.0
    assert counts == {10}


def test_without_the_exact_fallback_a_one_percent_filter_keeps_k_rows_and_recall(
    catalog: psycopg.Connection[Any],
) -> None:
    query = SimilarityQuery(k=10, attributes=["selvedge"], model_version=VERSION, exact_below=0)

    recall, counts = mean_recall(catalog, SELVEDGE, query)

    print(f"\nrecall@10 with a 1% attribute filter (no exact fallback): {recall:.3f}")
    assert recall >= 0.9
    assert counts == {10}


def test_a_filter_fewer_than_k_products_pass_returns_all_of_them(
    catalog: psycopg.Connection[Any],
) -> None:
    query = SimilarityQuery(k=50, attributes=["selvedge"], model_version=VERSION, exact_below=0)

    found = similarity.similar_to_product(catalog, IDS[0], query)

    assert sorted(r.product_id for r in found) == sorted(set(SELVEDGE) - {IDS[0]})
    assert [r.distance for r in found] == sorted(r.distance for r in found)


def test_label_and_attribute_filters_combine(catalog: psycopg.Connection[Any]) -> None:
    query = SimilarityQuery(k=5, labels=["slim"], attributes=["selvedge"], model_version=VERSION)

    found = similarity.similar_to_product(catalog, IDS[1], query)

    assert {r.product_id for r in found} <= set(SLIM) & set(SELVEDGE)
    assert len(found) == 5


@pytest.mark.parametrize("labels", [[], ["slim"]])
def test_a_query_scans_the_models_hnsw_index_unless_few_products_pass_its_filter(
    catalog: psycopg.Connection[Any], labels: list[str]
) -> None:
    index = database.embedding_index_name(VERSION, DIMENSION)
    scans = "SELECT pg_stat_get_xact_numscans(%s::regclass)"

    with catalog.transaction():
        similarity.similar_to_embedding(
            catalog, EMBEDDINGS[IDS[3]], SimilarityQuery(k=5, labels=labels)
        )
        row = catalog.execute(scans, (index,)).fetchone()

    assert row is not None and row[0] >= 1


def test_the_settings_of_a_query_do_not_leak_into_the_session(
    catalog: psycopg.Connection[Any],
) -> None:
    before = catalog.execute("SHOW hnsw.ef_search").fetchone()

    similarity.similar_to_product(catalog, IDS[0], SimilarityQuery(k=300))
    after = catalog.execute("SHOW hnsw.ef_search").fetchone()

    assert after == before


def test_an_unknown_product_is_not_found(catalog: psycopg.Connection[Any]) -> None:
    with pytest.raises(similarity.SimilarityNotFound, match="p-missing"):
        similarity.similar_to_product(catalog, "p-missing", SimilarityQuery())


def test_an_embedding_of_the_wrong_dimension_is_refused(catalog: psycopg.Connection[Any]) -> None:
    with pytest.raises(ValueError, match="3 dimensions"):
        similarity.similar_to_embedding(catalog, np.ones(3, np.float32), SimilarityQuery())


def test_queries_switch_to_a_new_model_only_once_it_covers_the_catalog(
    stack: LocalStack,
) -> None:
    old, new = random_embeddings(40, 8, seed=1), random_embeddings(40, 4, seed=2)
    half = dict(list(new.items())[:20])

    with catalog_database(stack) as url, database.connect(url) as conn:
        add_products(conn, "old@1", old)
        database.ensure_embedding_index(conn, "old@1", 8)
        add_products(conn, "new@2", half)
        database.ensure_embedding_index(conn, "new@2", 4)
        during = similarity.similar_to_product(conn, "p-0000", SimilarityQuery(k=3))
        only_new = similarity.similar_to_product(
            conn, "p-0000", SimilarityQuery(k=3, model_version="new@2")
        )
        add_products(conn, "new@2", {p: v for p, v in new.items() if p not in half})
        after = similarity.similar_to_product(conn, "p-0000", SimilarityQuery(k=3))

    assert {r.model_version for r in during} == {"old@1"}
    assert [r.product_id for r in during] == exact_nearest(old, old["p-0000"], 3, "p-0000")
    assert [r.product_id for r in only_new] == exact_nearest(half, new["p-0000"], 3, "p-0000")
    assert {r.model_version for r in after} == {"new@2"}
    assert [r.product_id for r in after] == exact_nearest(new, new["p-0000"], 3, "p-0000")

"""Migrations that derive rows from others: what they fill in and what keeps it current."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.worker.catalog import add_products, catalog_database, random_embeddings
from tests.worker.stores.test_database import VERSIONS, event_of, rows_for
from worker.local import LocalStack
from worker.stores import database


@pytest.fixture
def catalog_url(stack: LocalStack) -> Iterator[str]:
    with catalog_database(stack) as url:
        yield url


def counted(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Products per model version as the similarity functions see them."""
    rows = conn.execute("SELECT model_version, num_products FROM embedding_coverage").fetchall()
    return {version: int(count) for version, count in rows}


def actual(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Products per model version, counted in the embeddings table itself."""
    rows = conn.execute(
        "SELECT model_version, count(*) FROM embeddings GROUP BY model_version"
    ).fetchall()
    return {version: int(count) for version, count in rows}


def test_version_counts_follow_inserts_updates_deletes_and_truncate(catalog_url: str) -> None:
    vectors = random_embeddings(30, 8)
    images = random_embeddings(30, 4, seed=1)

    with database.connect(catalog_url) as conn:
        conn.autocommit = True
        add_products(conn, "emb@1", vectors)
        add_products(conn, "img@1", images, space="image")
        add_products(conn, "emb@2", dict(list(vectors.items())[:10]))
        after_inserts = counted(conn)
        conn.execute("UPDATE embeddings SET created_at = now() WHERE model_version = 'emb@1'")
        conn.execute("DELETE FROM products WHERE product_id IN ('p-0000', 'p-0001', 'p-0020')")
        after_deletes = counted(conn)
        truth = actual(conn)
        conn.execute("TRUNCATE embeddings")
        after_truncate = counted(conn)

    assert after_inserts == {"emb@1": 30, "img@1": 30, "emb@2": 10}
    assert after_deletes == truth == {"emb@1": 27, "img@1": 27, "emb@2": 8}
    assert after_truncate == {}


def test_concurrent_writers_of_one_version_lose_no_count(catalog_url: str) -> None:
    batches = [
        {f"w{writer}-{index}": vector for index, vector in enumerate(vectors.values())}
        for writer, vectors in enumerate(random_embeddings(25, 8, seed) for seed in range(4))
    ]

    def write(batch: dict[str, np.ndarray]) -> None:
        with database.connect(catalog_url) as conn:
            conn.autocommit = True
            for product_id, vector in batch.items():
                add_products(conn, "emb@1", {product_id: vector})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, batches))

    with database.connect(catalog_url) as conn:
        assert counted(conn) == actual(conn) == {"emb@1": 100}


def test_migration_0009_fills_labels_and_version_counts_from_rows_written_before_it(
    stack: LocalStack,
) -> None:
    with _database_at("0008", stack) as url:
        with database.connect(url) as conn:
            conn.autocommit = True
            add_products(
                conn,
                "emb@1",
                random_embeddings(5, 8),
                labels={"p-0000": ["jeans", "denim"], "p-0001": ["skirt"]},
            )

        applied = database.migrate(url)

        with database.connect(url) as conn:
            labels = dict(
                conn.execute("SELECT product_id, labels FROM products ORDER BY 1").fetchall()
            )
            versions = counted(conn)

    assert applied == ["0009_similarity_at_scale.sql"]
    assert labels == {
        "p-0000": ["denim", "jeans"],
        "p-0001": ["skirt"],
        "p-0002": [],
        "p-0003": [],
        "p-0004": [],
    }
    assert versions == {"emb@1": 5}


@contextmanager
def _database_at(last: str, stack: LocalStack) -> Iterator[str]:
    """A new database migrated up to and including the migration numbered `last`."""
    url = stack.settings.database_url.get_secret_value()
    name = f"migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = make_conninfo(url, dbname=name)

    migrations = resources.files("worker.stores").joinpath("migrations")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz)"
        )
        for entry in sorted(migrations.iterdir(), key=lambda entry: entry.name):
            if entry.name.endswith(".sql") and entry.name[:4] <= last:
                conn.execute(entry.read_text().encode())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (entry.name,))
    try:
        yield database_url
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_model_rolled_back_and_enriched_again_is_queried_again(catalog_url: str) -> None:
    first = [rows_for(f"p-{index}", np.ones(4)) for index in range(3)]
    newer = VERSIONS.model_copy(update={"embedding": "emb@2"})
    rollouts = [first, [event_of(rows, model_versions=newer) for rows in first]]
    rollouts.append([event_of(rows) for rows in first])  # back to emb@1

    chosen = []
    with database.connect(catalog_url) as conn:
        conn.autocommit = True
        for rollout in rollouts:
            for rows in rollout:
                database.write_enrichment(conn, rows)
            row = conn.execute("SELECT model_version FROM similarity_model_version()").fetchone()
            chosen.append(None if row is None else row[0])

    assert chosen == ["emb@1", "emb@2", "emb@1"]


def test_a_deletion_does_not_wait_for_an_enrichment_writing_other_products_versions(
    catalog_url: str,
) -> None:
    text, image = "sentence-transformers/x:mean@1", "ccp-tagger@1+avgpool"
    with database.connect(catalog_url) as setup:
        setup.autocommit = True
        add_products(setup, text, random_embeddings(2, 8))
        add_products(setup, image, random_embeddings(2, 4, seed=1), space="image")

    with database.connect(catalog_url) as writer, database.connect(catalog_url) as deleter:
        writer.execute("SELECT 1")  # a transaction, left open until the end
        add_products(writer, text, {"p-new": random_embeddings(1, 8)["p-0000"]})
        deleter.execute("SET lock_timeout = '2s'")
        deleter.execute("DELETE FROM products WHERE product_id = 'p-0000'")
        deleter.commit()
        add_products(writer, image, {"p-new": random_embeddings(1, 4)["p-0000"]}, space="image")
        writer.commit()

        counts = counted(writer)

    assert counts == {text: 2, image: 2}


def test_compacting_the_version_counts_keeps_their_sums(catalog_url: str) -> None:
    with database.connect(catalog_url) as conn:
        conn.autocommit = True
        for index, vector in enumerate(random_embeddings(20, 8).values()):
            add_products(conn, "emb@1", {f"q-{index}": vector})
        before = counted(conn)
        conn.execute("SELECT compact_embedding_versions()")
        after = counted(conn)
        rows_left = conn.execute("SELECT count(*) FROM embedding_versions").fetchone()

    assert before == after == {"emb@1": 20}
    assert rows_left == (1,)

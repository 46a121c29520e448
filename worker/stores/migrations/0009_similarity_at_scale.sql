-- Similarity queries at catalog scale (docs/benchmarks.md, 1,000,000 products): two parts of
-- a query read rows in proportion to the catalog, not to k. A query without a model version
-- chose it through `embedding_coverage`, which counts every embedding and enrichment; a label
-- filter looked up each candidate's latest enrichment and its labels, row by row. Both now
-- read rows kept up to date when enrichments and embeddings are written.

-- A product's labels: those of its latest enriched enrichment (of the enrichment holding its
-- results, for a reuse), on any image, sorted and without repeats. Label filters read them
-- here, through a GIN index, like attribute filters read `attributes`.
ALTER TABLE products ADD COLUMN labels text[] NOT NULL DEFAULT '{}';

-- Sets `labels` of these products from their latest enriched enrichments; a product without
-- one gets none.
CREATE FUNCTION refresh_product_labels(product_ids text[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE products p SET labels = current.labels
    FROM (
        SELECT ids.product_id, coalesce((
            SELECT array_agg(DISTINCT l.label ORDER BY l.label) FROM labels l
            WHERE l.enrichment_id = (
                SELECT coalesce(n.reused_enrichment_id, n.enrichment_id) FROM enrichments n
                WHERE n.product_id = ids.product_id AND n.status = 'enriched'
                ORDER BY n.created_at DESC, n.enrichment_id DESC LIMIT 1)
        ), '{}') AS labels
        FROM unnest(product_ids) AS ids (product_id)
    ) AS current
    WHERE p.product_id = current.product_id AND p.labels IS DISTINCT FROM current.labels
$$;

-- An enriched enrichment refreshes its product's labels when its transaction commits, after
-- its labels are in, whoever wrote it: a worker of the previous release still running while
-- this one rolls out included. A failed enrichment leaves them as they were.
CREATE FUNCTION refresh_labels_of_enriched_product() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM refresh_product_labels(ARRAY[NEW.product_id]);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER enrichments_refresh_product_labels
    AFTER INSERT OR UPDATE OF status, reused_enrichment_id, created_at ON enrichments
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.status = 'enriched')
    EXECUTE FUNCTION refresh_labels_of_enriched_product();

WITH latest AS (
    SELECT DISTINCT ON (n.product_id)
           n.product_id, coalesce(n.reused_enrichment_id, n.enrichment_id) AS holder
    FROM enrichments n WHERE n.status = 'enriched'
    ORDER BY n.product_id, n.created_at DESC, n.enrichment_id DESC
), current AS (
    SELECT latest.product_id, array_agg(DISTINCT l.label ORDER BY l.label) AS labels
    FROM latest JOIN labels l ON l.enrichment_id = latest.holder
    GROUP BY latest.product_id
)
UPDATE products p SET labels = current.labels
FROM current WHERE p.product_id = current.product_id;

CREATE INDEX products_labels_idx ON products USING gin (labels);

-- How many products each model version has an embedding for, kept by triggers on
-- `embeddings`, whoever writes it (bulk loads pay one update per statement). Each version
-- has up to 16 rows, one per `shard` (the writing backend's pid modulo 16), so that
-- concurrent writers of one version do not queue on one row; readers sum them.
-- `first_seen` is the earliest `created_at` written; it stays when those rows are deleted.
CREATE TABLE embedding_versions (
    model_version text NOT NULL,
    shard         int NOT NULL,
    space         text NOT NULL,
    dimension     int NOT NULL,
    num_products  bigint NOT NULL,
    first_seen    timestamptz NOT NULL,
    PRIMARY KEY (model_version, shard)
);

INSERT INTO embedding_versions (model_version, shard, space, dimension, num_products, first_seen)
SELECT e.model_version, 0, min(e.space), min(e.dimension), count(*), min(e.created_at)
FROM embeddings e GROUP BY e.model_version;

CREATE FUNCTION count_embedding_versions() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    versions text[];
    spaces text[];
    dimensions int[];
    deltas bigint[];
    first_seen timestamptz[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM embedding_versions;
        RETURN NULL;
    END IF;

    -- Per version: rows in (NEW TABLE) and out (OLD TABLE). A statement is planned when it
    -- first runs, so each branch names only the transition tables its trigger has.
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(w.model_version), array_agg(w.space), array_agg(w.dimension),
               array_agg(w.n), array_agg(w.first_seen)
        INTO versions, spaces, dimensions, deltas, first_seen
        FROM (SELECT model_version, min(space) AS space, min(dimension) AS dimension,
                     count(*) AS n, min(created_at) AS first_seen
              FROM written GROUP BY model_version) AS w;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(r.model_version), array_agg(r.space), array_agg(r.dimension),
               array_agg(-r.n), array_agg(now())
        INTO versions, spaces, dimensions, deltas, first_seen
        FROM (SELECT model_version, min(space) AS space, min(dimension) AS dimension,
                     count(*) AS n
              FROM removed GROUP BY model_version) AS r;
    ELSE
        SELECT array_agg(m.model_version), array_agg(m.space), array_agg(m.dimension),
               array_agg(m.n), array_agg(m.first_seen)
        INTO versions, spaces, dimensions, deltas, first_seen
        FROM (SELECT model_version, min(space) AS space, min(dimension) AS dimension,
                     sum(delta) AS n, coalesce(min(created_at) FILTER (WHERE delta > 0), now())
                     AS first_seen
              FROM (SELECT model_version, space, dimension, created_at, 1 AS delta FROM written
                    UNION ALL
                    SELECT model_version, space, dimension, created_at, -1 FROM removed) AS u
              GROUP BY model_version) AS m;
    END IF;

    -- In version order, so that two statements never lock the same rows in opposite orders.
    INSERT INTO embedding_versions AS v
        (model_version, shard, space, dimension, num_products, first_seen)
    SELECT c.model_version, pg_backend_pid() % 16, c.space, c.dimension, c.delta, c.first_seen
    FROM unnest(versions, spaces, dimensions, deltas, first_seen)
        AS c (model_version, space, dimension, delta, first_seen)
    WHERE c.delta <> 0
    ORDER BY c.model_version
    ON CONFLICT (model_version, shard) DO UPDATE
    SET num_products = v.num_products + excluded.num_products,
        first_seen = least(v.first_seen, excluded.first_seen);
    RETURN NULL;
END
$$;

-- PostgreSQL gives transition tables to one-event triggers only: one trigger per event.
CREATE TRIGGER embeddings_counted_on_insert
    AFTER INSERT ON embeddings REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION count_embedding_versions();
CREATE TRIGGER embeddings_counted_on_update
    AFTER UPDATE ON embeddings REFERENCING OLD TABLE AS removed NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION count_embedding_versions();
CREATE TRIGGER embeddings_counted_on_delete
    AFTER DELETE ON embeddings REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION count_embedding_versions();
CREATE TRIGGER embeddings_counted_on_truncate
    AFTER TRUNCATE ON embeddings
    FOR EACH STATEMENT EXECUTE FUNCTION count_embedding_versions();

-- Coverage from the counts; only the catalog's size is still counted here (for people and
-- dashboards; queries do not read this view any more).
CREATE OR REPLACE VIEW embedding_coverage AS
WITH catalog AS (
    SELECT count(DISTINCT product_id) AS num_enriched FROM enrichments WHERE status = 'enriched'
), versions AS (
    SELECT v.model_version, min(v.dimension) AS dimension, sum(v.num_products)::bigint AS num_products,
           min(v.first_seen) AS first_seen, min(v.space) AS space
    FROM embedding_versions v GROUP BY v.model_version HAVING sum(v.num_products) > 0
)
SELECT versions.model_version,
       versions.dimension,
       versions.num_products,
       catalog.num_enriched,
       versions.num_products::float8 / greatest(catalog.num_enriched, 1) AS coverage,
       versions.first_seen,
       versions.space
FROM versions CROSS JOIN catalog;

-- The rule of 0004 and 0006 without counting the catalog: a product with an embedding has an
-- enriched enrichment, so no version covers more products than the catalog has, and the
-- versions that cover it all are those with the most products. "The newest that covers the
-- whole catalog, else the one with the highest coverage, the newest on ties" is therefore
-- "the most products, the newest on ties".
CREATE OR REPLACE FUNCTION similarity_model_version(space text DEFAULT 'text')
RETURNS TABLE (model_version text, dimension int)
LANGUAGE sql STABLE AS $$
    SELECT v.model_version, min(v.dimension)
    FROM embedding_versions v
    WHERE v.space = similarity_model_version.space
    GROUP BY v.model_version
    HAVING sum(v.num_products) > 0
    ORDER BY sum(v.num_products) DESC, min(v.first_seen) DESC
    LIMIT 1
$$;

-- As in 0006, with the label filter on the product's row.
CREATE OR REPLACE FUNCTION _similarity_candidates(model_version text, dimension int)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format($q$
        FROM embeddings e JOIN products p ON p.product_id = e.product_id
        WHERE e.model_version = %L
          AND ($2::text IS NULL OR e.product_id <> $2::text)
          AND (cardinality($4::text[]) = 0 OR p.attributes @> $4::text[])
          AND (cardinality($3::text[]) = 0 OR p.labels @> $3::text[])
    $q$, model_version)
$$;

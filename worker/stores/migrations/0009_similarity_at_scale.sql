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

-- A written, changed or removed enrichment refreshes its product's labels when its
-- transaction commits, after its labels are in, whoever wrote it: a worker of the previous
-- release still running while this one rolls out included. Refreshing is idempotent, so an
-- enrichment that cannot change them (a new failure) costs one lookup.
CREATE FUNCTION refresh_labels_of_enrichment_product() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM refresh_product_labels(ARRAY[OLD.product_id]);
    ELSE
        PERFORM refresh_product_labels(ARRAY[NEW.product_id]);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER enrichments_refresh_product_labels
    AFTER INSERT OR UPDATE OR DELETE ON enrichments
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION refresh_labels_of_enrichment_product();

SELECT refresh_product_labels(ARRAY(SELECT product_id FROM products));

CREATE INDEX products_labels_idx ON products USING gin (labels);

-- How many products each model version has an embedding for, kept by triggers on
-- `embeddings`, whoever writes it (bulk loads pay one row per statement). Writers only ever
-- append a row of changes per statement and version, so they neither wait for each other nor
-- deadlock; readers sum the rows, and `compact_embedding_versions()` folds them into one per
-- version from time to time (a writer does it on about one statement in 64).
CREATE TABLE embedding_versions (
    model_version text NOT NULL,
    space         text NOT NULL,
    dimension     int NOT NULL,
    num_products  bigint NOT NULL
);

INSERT INTO embedding_versions (model_version, space, dimension, num_products)
SELECT e.model_version, e.space, min(e.dimension), count(*)
FROM embeddings e GROUP BY e.model_version, e.space;

-- The first embedding of a version, which the version rule reads, is found through this
-- index in one step per version; it replaces 0001's index on model_version alone.
CREATE INDEX embeddings_model_created_idx ON embeddings (model_version, created_at);
DROP INDEX embeddings_model_idx;

-- One row per version and space; the rows it replaces are deleted in the same transaction,
-- so readers see either all of them or their sum. Two compactions at once: the second skips.
CREATE FUNCTION compact_embedding_versions() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(72007009) THEN
        RETURN;
    END IF;
    WITH folded AS (
        DELETE FROM embedding_versions RETURNING model_version, space, dimension, num_products
    )
    INSERT INTO embedding_versions (model_version, space, dimension, num_products)
    SELECT f.model_version, f.space, min(f.dimension), sum(f.num_products)
    FROM folded f GROUP BY f.model_version, f.space
    HAVING sum(f.num_products) <> 0;
END
$$;

CREATE FUNCTION count_embedding_versions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM embedding_versions;
        RETURN NULL;
    END IF;

    -- Rows in (NEW TABLE) and out (OLD TABLE) per version and space. A statement is planned
    -- when it first runs, so each branch names only the transition tables its trigger has.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO embedding_versions (model_version, space, dimension, num_products)
        SELECT w.model_version, w.space, min(w.dimension), count(*)
        FROM written w GROUP BY w.model_version, w.space;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO embedding_versions (model_version, space, dimension, num_products)
        SELECT r.model_version, r.space, min(r.dimension), -count(*)
        FROM removed r GROUP BY r.model_version, r.space;
    ELSE
        INSERT INTO embedding_versions (model_version, space, dimension, num_products)
        SELECT m.model_version, m.space, min(m.dimension), sum(m.delta)
        FROM (SELECT w.model_version, w.space, w.dimension, 1 AS delta FROM written w
              UNION ALL
              SELECT r.model_version, r.space, r.dimension, -1 FROM removed r) AS m
        GROUP BY m.model_version, m.space
        HAVING sum(m.delta) <> 0;
    END IF;

    IF random() < 1.0 / 64 THEN
        PERFORM compact_embedding_versions();
    END IF;
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

-- Products per version and space, and the version's first embedding.
CREATE FUNCTION embedding_version_counts(space text DEFAULT NULL)
RETURNS TABLE (model_version text, space text, dimension int, num_products bigint,
               first_seen timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT v.model_version, v.space, v.dimension, v.num_products, first.created_at
    FROM (
        SELECT c.model_version, c.space, min(c.dimension) AS dimension,
               sum(c.num_products)::bigint AS num_products
        FROM embedding_versions c
        WHERE embedding_version_counts.space IS NULL OR c.space = embedding_version_counts.space
        GROUP BY c.model_version, c.space
        HAVING sum(c.num_products) > 0
    ) AS v
    CROSS JOIN LATERAL (
        SELECT e.created_at FROM embeddings e
        WHERE e.model_version = v.model_version AND e.space = v.space
        ORDER BY e.created_at LIMIT 1
    ) AS first
$$;

-- Coverage from the counts; only the catalog's size is still counted here (for people and
-- dashboards; queries do not read this view any more).
CREATE OR REPLACE VIEW embedding_coverage AS
WITH catalog AS (
    SELECT count(DISTINCT product_id) AS num_enriched FROM enrichments WHERE status = 'enriched'
)
SELECT v.model_version,
       v.dimension,
       v.num_products,
       catalog.num_enriched,
       v.num_products::float8 / greatest(catalog.num_enriched, 1) AS coverage,
       v.first_seen,
       v.space
FROM embedding_version_counts() v CROSS JOIN catalog;

-- The rule of 0004 and 0006 without counting the catalog: a product with an embedding has an
-- enriched enrichment, so no version covers more products than the catalog has, and the
-- versions that cover it all are those with the most products. "The newest (by its first
-- embedding) that covers the whole catalog, else the one with the highest coverage, the
-- newest on ties" is therefore "the most products, the newest on ties". A version whose
-- products are all enriched again (a rollback, say) has its first embedding moved forward by
-- the rewrite, as before.
CREATE OR REPLACE FUNCTION similarity_model_version(space text DEFAULT 'text')
RETURNS TABLE (model_version text, dimension int)
LANGUAGE sql STABLE AS $$
    SELECT v.model_version, v.dimension
    FROM embedding_version_counts(similarity_model_version.space) v
    ORDER BY v.num_products DESC, v.first_seen DESC
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

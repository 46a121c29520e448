-- Image embeddings as their own space beside the text embeddings, and each enrichment's
-- identity, so that an unchanged product is not enriched twice (docs/similarity.md,
-- docs/runbook.md).

-- An enrichment's identity is its product, `input_sha256` (the embedded product text and the
-- images' sha256 in order, see worker.enrichment.input_sha256) and `model_versions`. An event
-- whose product has the same identity as its latest enriched enrichment runs no model: its
-- row points at the enrichment that holds the results (`reused_enrichment_id`, always one
-- with results of its own) and writes no images, masks, labels or embeddings.
ALTER TABLE enrichments
    ADD COLUMN input_sha256 text,
    ADD COLUMN reused_enrichment_id bigint REFERENCES enrichments ON DELETE CASCADE;
CREATE INDEX enrichments_reused_idx ON enrichments (reused_enrichment_id)
    WHERE reused_enrichment_id IS NOT NULL;

-- Which space a product's embedding lives in: `text` (the embedding stage) or `image` (the
-- mean of the product's image embeddings, unit length). A model version belongs to one space.
ALTER TABLE embeddings
    ADD COLUMN space text NOT NULL DEFAULT 'text' CHECK (space IN ('text', 'image'));

-- Vectors stay in the table's own pages where they fit (a 1280-d image vector is 5 kB):
-- moved out to TOAST, their reading cost is invisible to the planner, which then prefers
-- scanning every row of a few thousand products to the HNSW index. Applies to rows written
-- from now on.
ALTER TABLE embeddings ALTER COLUMN embedding SET STORAGE MAIN;

-- One image embedding per photo of an enrichment, beside its masks and labels.
CREATE TABLE image_embeddings (
    enrichment_id bigint NOT NULL,
    image_index   int NOT NULL,
    model_version text NOT NULL,
    dimension     int NOT NULL,
    embedding     vector NOT NULL,
    PRIMARY KEY (enrichment_id, image_index),
    FOREIGN KEY (enrichment_id, image_index) REFERENCES images ON DELETE CASCADE,
    CHECK (vector_dims(embedding) = dimension)
);
ALTER TABLE image_embeddings ALTER COLUMN embedding SET STORAGE MAIN;

-- Coverage per model version, now with its space (a new column goes last in a view).
CREATE OR REPLACE VIEW embedding_coverage AS
WITH catalog AS (
    SELECT count(DISTINCT product_id) AS num_enriched FROM enrichments WHERE status = 'enriched'
)
SELECT e.model_version,
       min(e.dimension) AS dimension,
       count(*) AS num_products,
       catalog.num_enriched,
       count(*)::float8 / greatest(catalog.num_enriched, 1) AS coverage,
       min(e.created_at) AS first_seen,
       min(e.space) AS space
FROM embeddings e CROSS JOIN catalog
GROUP BY e.model_version, catalog.num_enriched;

-- The functions of 0004 gain a `space` argument (default 'text', so existing calls keep
-- their meaning); the old signatures go so that no call is ambiguous.
DROP FUNCTION similar_products(text, int, text[], text[], text, int, int);
DROP FUNCTION similar_to_embedding(vector, int, text[], text[], text, text, int, int);
DROP FUNCTION similarity_model_version();

CREATE FUNCTION _check_space(space text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF space IS NULL OR space NOT IN ('text', 'image') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('space must be text or image, got %s', coalesce(space, 'null'));
    END IF;
END
$$;

-- The rule of 0004 within one space: the newest version that covers the whole catalog, else
-- the one with the highest coverage, the newest on ties.
CREATE FUNCTION similarity_model_version(space text DEFAULT 'text')
RETURNS TABLE (model_version text, dimension int)
LANGUAGE sql STABLE AS $$
    SELECT c.model_version, c.dimension
    FROM embedding_coverage c
    WHERE c.space = similarity_model_version.space
    ORDER BY c.coverage >= 1 DESC, c.coverage DESC, c.first_seen DESC
    LIMIT 1
$$;

-- As in 0004, except that labels are read from the enrichment holding the results of the
-- product's latest enriched enrichment (itself, or the one it reused).
CREATE OR REPLACE FUNCTION _similarity_candidates(model_version text, dimension int)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format($q$
        FROM embeddings e JOIN products p ON p.product_id = e.product_id
        WHERE e.model_version = %L
          AND ($2::text IS NULL OR e.product_id <> $2::text)
          AND (cardinality($4::text[]) = 0 OR p.attributes @> $4::text[])
          AND (cardinality($3::text[]) = 0 OR (
              SELECT array_agg(l.label) FROM labels l
              WHERE l.enrichment_id = (
                  SELECT coalesce(n.reused_enrichment_id, n.enrichment_id) FROM enrichments n
                  WHERE n.product_id = e.product_id AND n.status = 'enriched'
                  ORDER BY n.created_at DESC, n.enrichment_id DESC LIMIT 1)
          ) @> $3::text[])
    $q$, model_version)
$$;

-- The k nearest products to an embedding of one space, filtered; the search itself is that
-- of 0004 (iterative HNSW scan, exact search for selective filters and as the fallback).
CREATE FUNCTION similar_to_embedding(
    query vector,
    k int DEFAULT 10,
    labels text[] DEFAULT '{}',
    attributes text[] DEFAULT '{}',
    model_version text DEFAULT NULL,
    exclude_product_id text DEFAULT NULL,
    exact_below int DEFAULT 1000,
    ef_search int DEFAULT NULL,
    space text DEFAULT 'text'
) RETURNS SETOF similar_product
LANGUAGE plpgsql
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = 40
AS $$
DECLARE
    chosen text := model_version;
    dim int;
    candidates text;
    matching bigint;
    nearest similar_product[];
    exact_sql text;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('k must be between 1 and 1000, got %s', k);
    END IF;
    PERFORM _check_space(space);

    IF chosen IS NULL THEN
        SELECT v.model_version, v.dimension INTO chosen, dim FROM similarity_model_version(space) v;
    ELSE
        -- One row tells the dimension; min() over the version would read all of its rows.
        SELECT e.dimension INTO dim FROM embeddings e
        WHERE e.model_version = chosen AND e.space = similar_to_embedding.space LIMIT 1;
    END IF;
    IF dim IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format(
            'no embeddings of model version %s in the %s space', coalesce(chosen, '(any)'), space);
    END IF;
    IF vector_dims(query) <> dim THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format(
            'query embedding has %s dimensions; model version %s has %s',
            vector_dims(query), chosen, dim);
    END IF;

    candidates := _similarity_candidates(chosen, dim);
    exact_sql := format($q$
        WITH c AS MATERIALIZED (SELECT e.product_id, p.title, e.embedding::vector(%1$s) AS v %2$s)
        SELECT c.product_id, c.title, (c.v <=> $1::vector(%1$s))::float8, %3$L::text
        FROM c ORDER BY 3, 1 LIMIT %4$s
    $q$, dim, candidates, chosen, k);

    IF cardinality(labels) > 0 OR cardinality(attributes) > 0 THEN
        EXECUTE format('SELECT count(*) FROM (SELECT 1 %s LIMIT %s) s', candidates, exact_below + 1)
            INTO matching USING query, exclude_product_id, labels, attributes;
        IF matching <= exact_below THEN
            RETURN QUERY EXECUTE exact_sql USING query, exclude_product_id, labels, attributes;
            RETURN;
        END IF;
    END IF;

    PERFORM set_config('hnsw.ef_search', least(1000, coalesce(ef_search, greatest(40, 2 * k)))::text, true);
    EXECUTE format($q$
        WITH nearest AS MATERIALIZED (
            SELECT e.product_id, p.title, (e.embedding::vector(%1$s) <=> $1::vector(%1$s))::float8 AS d
            %2$s
            ORDER BY e.embedding::vector(%1$s) <=> $1::vector(%1$s) LIMIT %3$s)
        SELECT array_agg(ROW(n.product_id, n.title, n.d, %4$L::text)::similar_product
                         ORDER BY n.d, n.product_id)
        FROM nearest n
    $q$, dim, candidates, 2 * k, chosen)
        INTO nearest USING query, exclude_product_id, labels, attributes;

    IF coalesce(cardinality(nearest), 0) < k THEN
        RETURN QUERY EXECUTE exact_sql USING query, exclude_product_id, labels, attributes;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM unnest(nearest[1:k]);
END
$$;

-- The k products nearest to one product in one space, itself excluded; the version rule and
-- the fallback to the product's newest version are those of 0004, within the space.
CREATE FUNCTION similar_products(
    product_id text,
    k int DEFAULT 10,
    labels text[] DEFAULT '{}',
    attributes text[] DEFAULT '{}',
    model_version text DEFAULT NULL,
    exact_below int DEFAULT 1000,
    ef_search int DEFAULT NULL,
    space text DEFAULT 'text'
) RETURNS SETOF similar_product
LANGUAGE plpgsql AS $$
DECLARE
    target text := product_id;
    chosen text := model_version;
    query vector;
BEGIN
    PERFORM _check_space(space);
    IF chosen IS NULL THEN
        SELECT v.model_version INTO chosen FROM similarity_model_version(space) v;
    END IF;
    SELECT e.embedding INTO query FROM embeddings e
    WHERE e.product_id = target AND e.model_version = chosen
      AND e.space = similar_products.space;

    IF query IS NULL AND model_version IS NULL THEN
        SELECT e.model_version, e.embedding INTO chosen, query FROM embeddings e
        WHERE e.product_id = target AND e.space = similar_products.space
        ORDER BY e.created_at DESC LIMIT 1;
    END IF;
    IF query IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format(
            'product %s has no embedding of model version %s in the %s space',
            target, coalesce(chosen, '(any)'), space);
    END IF;

    RETURN QUERY SELECT * FROM similar_to_embedding(
        query, k, labels, attributes, chosen, target, exact_below, ef_search, space);
END
$$;

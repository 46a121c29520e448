-- Similarity queries that other services call directly; docs/similarity.md describes them.
-- worker/similarity.py calls the same functions, so that there is one implementation.

-- Attribute filters (`attributes @> '{slim fit}'`) find their products through this index.
CREATE INDEX products_attributes_idx ON products USING gin (attributes);

-- How much of the catalog each embedding model version covers: products with an embedding
-- of that version over products with an enriched enrichment.
CREATE VIEW embedding_coverage AS
WITH catalog AS (
    SELECT count(DISTINCT product_id) AS num_enriched FROM enrichments WHERE status = 'enriched'
)
SELECT e.model_version,
       min(e.dimension) AS dimension,
       count(*) AS num_products,
       catalog.num_enriched,
       count(*)::float8 / greatest(catalog.num_enriched, 1) AS coverage,
       min(e.created_at) AS first_seen
FROM embeddings e CROSS JOIN catalog
GROUP BY e.model_version, catalog.num_enriched;

-- The model version queries use unless they name one: the newest version (by first_seen)
-- that covers the whole catalog; when none does, the one with the highest coverage, the
-- newest on ties. A new model is therefore queried only once it has caught up.
CREATE FUNCTION similarity_model_version()
RETURNS TABLE (model_version text, dimension int)
LANGUAGE sql STABLE AS $$
    SELECT c.model_version, c.dimension
    FROM embedding_coverage c
    ORDER BY c.coverage >= 1 DESC, c.coverage DESC, c.first_seen DESC
    LIMIT 1
$$;

CREATE TYPE similar_product AS (
    product_id    text,
    title         text,
    distance      float8,
    model_version text
);

-- The candidates of a query: one model version's embeddings, less one product, whose
-- product carries all `attributes` and whose latest enriched enrichment has all `labels`
-- (on any image). $2 is the excluded product, $3 the labels, $4 the attributes.
CREATE FUNCTION _similarity_candidates(model_version text, dimension int)
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
                  SELECT n.enrichment_id FROM enrichments n
                  WHERE n.product_id = e.product_id AND n.status = 'enriched'
                  ORDER BY n.created_at DESC, n.enrichment_id DESC LIMIT 1)
          ) @> $3::text[])
    $q$, model_version)
$$;

-- The k nearest products to an embedding by cosine distance, filtered.
--
-- With no filter, or a filter that more than `exact_below` products pass, the model's HNSW
-- index is scanned iteratively (pgvector 0.8, relaxed order) until enough rows pass the
-- filter, twice k are kept, and those are re-ranked by exact distance. A filter that at
-- most `exact_below` products pass is answered by exact search over them. When the index
-- scan still finds fewer than k rows (it stops after hnsw.max_scan_tuples), exact search
-- answers instead, so k rows come back whenever k rows match.
CREATE FUNCTION similar_to_embedding(
    query vector,
    k int DEFAULT 10,
    labels text[] DEFAULT '{}',
    attributes text[] DEFAULT '{}',
    model_version text DEFAULT NULL,
    exclude_product_id text DEFAULT NULL,
    exact_below int DEFAULT 1000,
    ef_search int DEFAULT NULL
) RETURNS SETOF similar_product
LANGUAGE plpgsql
-- The SET clauses make every setting changed inside revert when the function returns.
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

    IF chosen IS NULL THEN
        SELECT v.model_version, v.dimension INTO chosen, dim FROM similarity_model_version() v;
    ELSE
        SELECT min(e.dimension) INTO dim FROM embeddings e WHERE e.model_version = chosen;
    END IF;
    IF dim IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002',
            MESSAGE = format('no embeddings of model version %s', coalesce(chosen, '(any)'));
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
        -- Counting stops past the threshold, so an unselective filter costs little here.
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

-- The k products nearest to one product, itself excluded. Without a model version the
-- rule of similarity_model_version() applies; a product enriched after a model change that
-- has no embedding of that version yet is compared in its newest model version instead.
CREATE FUNCTION similar_products(
    product_id text,
    k int DEFAULT 10,
    labels text[] DEFAULT '{}',
    attributes text[] DEFAULT '{}',
    model_version text DEFAULT NULL,
    exact_below int DEFAULT 1000,
    ef_search int DEFAULT NULL
) RETURNS SETOF similar_product
LANGUAGE plpgsql AS $$
DECLARE
    target text := product_id;
    chosen text := model_version;
    query vector;
BEGIN
    IF chosen IS NULL THEN
        SELECT v.model_version INTO chosen FROM similarity_model_version() v;
    END IF;
    SELECT e.embedding INTO query FROM embeddings e
    WHERE e.product_id = target AND e.model_version = chosen;

    IF query IS NULL AND model_version IS NULL THEN
        SELECT e.model_version, e.embedding INTO chosen, query FROM embeddings e
        WHERE e.product_id = target ORDER BY e.created_at DESC LIMIT 1;
    END IF;
    IF query IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format(
            'product %s has no embedding of model version %s', target, coalesce(chosen, '(any)'));
    END IF;

    RETURN QUERY SELECT * FROM similar_to_embedding(
        query, k, labels, attributes, chosen, target, exact_below, ef_search);
END
$$;

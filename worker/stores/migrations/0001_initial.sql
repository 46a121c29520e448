-- Products as the catalog described them, the enrichments made of them, and their results.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE products (
    product_id   text PRIMARY KEY,
    title        text NOT NULL,
    description  text NOT NULL DEFAULT '',
    attributes   text[] NOT NULL DEFAULT '{}',
    image_urls   text[] NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE enrichments (
    enrichment_id  bigserial PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    product_id     text NOT NULL REFERENCES products (product_id) ON DELETE CASCADE,
    status         text NOT NULL CHECK (status IN ('enriched', 'failed')),
    model_versions jsonb NOT NULL,
    error_stage    text,
    error_kind     text,
    error_reason   text,
    timings_ms     jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX enrichments_product_idx ON enrichments (product_id, created_at DESC);

CREATE TABLE images (
    enrichment_id bigint NOT NULL REFERENCES enrichments ON DELETE CASCADE,
    image_index   int NOT NULL,
    url           text NOT NULL,
    image_sha256  text NOT NULL,
    width         int NOT NULL,
    height        int NOT NULL,
    PRIMARY KEY (enrichment_id, image_index)
);

CREATE TABLE masks (
    enrichment_id bigint NOT NULL,
    image_index   int NOT NULL,
    mask_index    int NOT NULL,
    label         text NOT NULL,
    score         real NOT NULL,
    box           real[] NOT NULL CHECK (cardinality(box) = 4),
    area          int NOT NULL,
    uri           text NOT NULL,
    model_version text NOT NULL,
    PRIMARY KEY (enrichment_id, image_index, mask_index),
    FOREIGN KEY (enrichment_id, image_index) REFERENCES images ON DELETE CASCADE
);

CREATE TABLE labels (
    enrichment_id bigint NOT NULL,
    image_index   int NOT NULL,
    label         text NOT NULL,
    score         real NOT NULL,
    model_version text NOT NULL,
    PRIMARY KEY (enrichment_id, image_index, label),
    FOREIGN KEY (enrichment_id, image_index) REFERENCES images ON DELETE CASCADE
);
CREATE INDEX labels_label_idx ON labels (label);

-- One row per product and embedding model version. The column has no fixed dimension so
-- that models of different sizes live side by side; each model gets its own HNSW index
-- over a cast to its dimension (see worker.stores.database.ensure_embedding_index).
CREATE TABLE embeddings (
    product_id    text NOT NULL REFERENCES products (product_id) ON DELETE CASCADE,
    model_id      text NOT NULL,
    model_version text NOT NULL,
    dimension     int NOT NULL,
    embedding     vector NOT NULL,
    enrichment_id bigint NOT NULL REFERENCES enrichments ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, model_version),
    CHECK (vector_dims(embedding) = dimension)
);
CREATE INDEX embeddings_model_idx ON embeddings (model_version);

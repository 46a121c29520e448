-- Backfills (`enrich backfill`, the task enrichment.start_backfill): each run, the products it
-- submitted with the event id each got, and the source records it could not use. A run's
-- progress is its items joined with enrichments on the event id (done, failed, pending).

-- Products the catalog deleted. A backfill never submits them; the worker's deletion handling
-- creates the same table if it comes first.
CREATE TABLE IF NOT EXISTS deleted_products (
    product_id text PRIMARY KEY,
    deleted_at timestamptz
);

CREATE TABLE backfill_runs (
    run_id         text PRIMARY KEY,
    source         text NOT NULL,
    mode           text NOT NULL CHECK (mode IN ('missing', 'stale', 'all')),
    options        jsonb NOT NULL DEFAULT '{}',
    -- The current model versions when the latest pass started (stale means other than these).
    model_versions jsonb,
    -- What the latest pass over the source found: read, rejected, deleted, not_selected,
    -- already_submitted, duplicate, submitted.
    counts         jsonb NOT NULL DEFAULT '{}',
    passes         int NOT NULL DEFAULT 1,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- When the latest pass reached the end of the source; NULL while one is under way or
    -- after one stopped early (run it again to resume).
    finished_at    timestamptz
);
CREATE INDEX backfill_runs_started_idx ON backfill_runs (started_at DESC);

-- One row per product a run submitted, written once RabbitMQ confirmed its task message.
CREATE TABLE backfill_items (
    run_id       text NOT NULL REFERENCES backfill_runs ON DELETE CASCADE,
    product_id   text NOT NULL,
    event_id     uuid NOT NULL UNIQUE,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, product_id)
);

-- Source records that are no valid product event: the field, the value received (cut short)
-- and what the field allows; `position` is file:line, s3://bucket/key:line or row N.
CREATE TABLE backfill_rejects (
    run_id   text NOT NULL REFERENCES backfill_runs ON DELETE CASCADE,
    position text NOT NULL,
    field    text NOT NULL,
    value    text NOT NULL,
    allowed  text NOT NULL,
    PRIMARY KEY (run_id, position)
);

-- Backfill chunk messages (`enrichment.expand_backfill_chunk`): when a worker published an
-- item's enrich_product task. A chunk redelivered after its expansion was confirmed publishes
-- nothing again for the items already expanded.
ALTER TABLE backfill_items ADD COLUMN expanded_at timestamptz;

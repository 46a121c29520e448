-- Product deletion (product.deleted events, worker/stores/deletion.py): a tombstone per
-- deleted product, and a guard that keeps a deleted product from being written again.

-- One row per deleted product; `deleted_at` is the product-deleted event's occurred_at. The
-- backfill migration (0005) creates the same table, so whichever comes first creates it.
CREATE TABLE IF NOT EXISTS deleted_products (
    product_id text PRIMARY KEY,
    deleted_at timestamptz
);

-- A deletion removes the product's completion events from the outbox too; they carry the
-- product only in their body.
CREATE INDEX IF NOT EXISTS outbox_product_idx ON outbox ((body::jsonb ->> 'product_id'));

-- Writing a product that has a tombstone fails with SQLSTATE ENDEL, whoever writes it. The
-- worker clears the tombstone first when a product-created event is newer than the deletion
-- (a re-listed product); an older one is skipped before any model runs. This guard covers
-- the race between the two: an enrichment that started before the deletion committed and
-- writes after it. It runs once per statement, so bulk loads pay one join, not one per row.
CREATE FUNCTION refuse_deleted_products() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deleted record;
BEGIN
    SELECT d.product_id, d.deleted_at INTO deleted
    FROM written w JOIN deleted_products d ON d.product_id = w.product_id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'ENDEL',
            MESSAGE = format('product %s was deleted (at %s); it is not written again',
                             deleted.product_id, coalesce(deleted.deleted_at::text, 'an unknown time')),
            HINT = 'a product-created event newer than the deletion clears the tombstone';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER products_inserted_not_deleted
    AFTER INSERT ON products REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_deleted_products();
CREATE TRIGGER products_updated_not_deleted
    AFTER UPDATE ON products REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_deleted_products();

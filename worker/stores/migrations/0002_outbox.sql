-- Transactional outbox: a completion event is written in the same transaction as the
-- results it announces, and relayed to RabbitMQ afterwards with publisher confirms.
CREATE TABLE outbox (
    outbox_id    bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    body         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (outbox_id) WHERE published_at IS NULL;

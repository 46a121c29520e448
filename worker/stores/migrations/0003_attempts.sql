-- How often each event's task has started, so that a message that kills its worker every
-- time (a poison message) is dead-lettered instead of being redelivered forever.
CREATE TABLE attempts (
    event_id   uuid PRIMARY KEY,
    attempts   int NOT NULL,
    last_at    timestamptz NOT NULL DEFAULT now()
);

-- Idempotency keys of inbound events, log retention, the outbox of deliveries, and the
-- readiness heartbeat.
ALTER TABLE tasks ADD COLUMN idempotency_key TEXT;
ALTER TABLE tasks ADD COLUMN logs_deleted_at BIGINT;
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (channel_type, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_finished ON tasks (finished_at, id)
    WHERE finished_at IS NOT NULL AND logs_deleted_at IS NULL;

-- `seq` is the enqueue order; `kind` + `address` (channel type or URL) is the key under which
-- one task's deliveries go out one at a time. `target` is the whole target as JSON, including
-- a push notification's Authorization header (the sender needs it).
CREATE TABLE deliveries (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT COLLATE "C" NOT NULL UNIQUE,
    task_id         TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    address         TEXT NOT NULL,
    target          TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    claim_owner     TEXT,
    claim_until     BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, seq)
    WHERE status IN ('pending', 'failed');
CREATE INDEX deliveries_order ON deliveries (task_id, kind, address, seq);
CREATE INDEX deliveries_status ON deliveries (status, seq);
CREATE INDEX deliveries_settled ON deliveries (updated_at, seq)
    WHERE status IN ('sent', 'dead');

-- One row, rewritten by every readiness check: proof that a write commits.
CREATE TABLE store_heartbeat (
    id      BIGINT PRIMARY KEY NOT NULL,
    beat_at BIGINT NOT NULL
);
INSERT INTO store_heartbeat (id, beat_at) VALUES (1, 0);

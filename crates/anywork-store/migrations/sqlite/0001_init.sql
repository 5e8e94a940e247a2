-- AnyWork schema, SQLite. Times are unix milliseconds; JSON is stored as text, and so is free text
-- from outside (message, result, error, log payload), JSON-encoded, so that any string
-- round-trips on every backend.
CREATE TABLE sessions (
    id           TEXT PRIMARY KEY NOT NULL,
    channel_type TEXT NOT NULL,
    channel_key  TEXT,
    title        TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_active  INTEGER NOT NULL
);
CREATE UNIQUE INDEX sessions_channel_key ON sessions (channel_type, channel_key)
    WHERE channel_key IS NOT NULL;
CREATE INDEX sessions_last_active ON sessions (last_active DESC, id DESC);

CREATE TABLE tasks (
    id                          TEXT PRIMARY KEY NOT NULL,
    session_id                  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    channel_type                TEXT NOT NULL,
    channel_meta                TEXT NOT NULL,
    status                      TEXT NOT NULL,
    message                     TEXT NOT NULL,
    skills                      TEXT NOT NULL,
    mcp_servers                 TEXT NOT NULL,
    result                      TEXT,
    structured_output           TEXT,
    error                       TEXT,
    cost_usd                    REAL,
    input_tokens                INTEGER NOT NULL DEFAULT 0,
    output_tokens               INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens     INTEGER NOT NULL DEFAULT 0,
    num_turns                   INTEGER NOT NULL DEFAULT 0,
    duration_ms                 INTEGER,
    worker_id                   TEXT,
    push_notification           TEXT,
    lease_owner                 TEXT,
    lease_expires_at            INTEGER,
    created_at                  INTEGER NOT NULL,
    started_at                  INTEGER,
    finished_at                 INTEGER,
    last_seq                    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_session ON tasks (session_id, created_at, id);
CREATE INDEX tasks_status ON tasks (status, created_at, id);
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

CREATE TABLE task_logs (
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    type       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;

-- Server-wide settings as text under a key (the default SOUL.md and AGENTS.md of new sessions).
CREATE TABLE settings (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

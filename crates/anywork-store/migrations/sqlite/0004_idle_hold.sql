-- The idle reaper's hold on a session (TaskStore::hold_idle_session): who holds it and until
-- when (unix ms). While it lasts, the session's worker may be going away, and a task of the
-- session waits before it asks the driver for one.
ALTER TABLE sessions ADD COLUMN idle_hold_owner TEXT;
ALTER TABLE sessions ADD COLUMN idle_hold_until INTEGER;

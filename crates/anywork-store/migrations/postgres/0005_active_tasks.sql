-- The active tasks (pending, running, waiting for input) of each session, and nothing else: a
-- claim checks that it is its session's turn among these (its `NOT EXISTS` repeats this
-- condition word for word, so that the index is used), not among every task the session ever
-- had, so that a claim's cost does not grow with the session's history. A task leaves the
-- index when it ends.
CREATE INDEX tasks_session_active ON tasks (session_id, created_at, id)
    WHERE (status = 'pending' OR status = 'running' OR status = 'input_required');

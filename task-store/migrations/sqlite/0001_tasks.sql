-- A device's tasks (SQLite). Times are microseconds since the Unix epoch. Ids are
-- lowercase hyphenated UUIDs stored as text, so text order is UUID order.

CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    title        TEXT NOT NULL,
    description  TEXT NOT NULL,
    status       TEXT NOT NULL
                 CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    command      TEXT,                      -- JSON array of strings, NULL when none
    requirements TEXT NOT NULL,             -- JSON array of strings
    input        TEXT,                      -- JSON value, NULL when none
    output       TEXT,                      -- JSON value, NULL when none
    exit_code    INTEGER,
    error        TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- Newest-first listing and keyset pagination, with and without a status filter.
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_status_created ON tasks (status, created_at DESC, id DESC);

CREATE TABLE task_logs (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,               -- 1, 2, ... per task, without gaps
    stream  TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    at      INTEGER NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);

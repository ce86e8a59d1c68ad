-- One row the hub rewrites, at most once a second, to prove to /readyz that the catalog
-- can commit a write.
CREATE TABLE readiness (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    checked_at INTEGER NOT NULL
);

-- One row the hubs rewrite, each at most once a second, to prove to /readyz that the
-- catalog can commit a write.
CREATE TABLE readiness (
    id         SMALLINT PRIMARY KEY CHECK (id = 1),
    checked_at BIGINT NOT NULL
);

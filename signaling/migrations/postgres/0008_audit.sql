-- Security-relevant events, newest last: who did what (a user and the key of their
-- session, or a device), to which device and whom, from where, and when. Never a secret.
-- Rows older than the hub's audit retention are pruned as new ones are written.
CREATE TABLE audit_events (
    seq          BIGSERIAL PRIMARY KEY,
    at           BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    actor_user   TEXT,
    actor_key    TEXT,
    actor_device TEXT,
    device       TEXT,
    target_user  TEXT,
    source       TEXT,
    detail       TEXT
);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_device ON audit_events (device, seq);
CREATE INDEX audit_events_actor_user ON audit_events (actor_user, seq);
CREATE INDEX audit_events_target_user ON audit_events (target_user, seq);

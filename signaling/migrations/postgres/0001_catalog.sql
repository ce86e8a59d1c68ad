-- The hub catalog (PostgreSQL). Timestamps are unix seconds; secrets are stored as hashes.

CREATE TABLE hub_secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,            -- uuid, hyphenated lowercase
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id),
    secret_hash BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE INDEX api_keys_user_id ON api_keys (user_id);

CREATE TABLE devices (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    services     TEXT NOT NULL,             -- JSON array of ServiceInfo
    capabilities TEXT NOT NULL,             -- JSON array of strings
    created_at   BIGINT NOT NULL
);

CREATE TABLE device_owners (
    device_id TEXT NOT NULL REFERENCES devices (id),
    user_id   TEXT NOT NULL REFERENCES users (id),
    added_at  BIGINT NOT NULL,
    PRIMARY KEY (device_id, user_id)
);

CREATE INDEX device_owners_user_id ON device_owners (user_id);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('setup', 'share')),
    secret_hash BYTEA NOT NULL,
    created_by  TEXT NOT NULL REFERENCES users (id),
    device_id   TEXT REFERENCES devices (id),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    used_by     TEXT REFERENCES users (id)
);

CREATE INDEX tokens_created_by ON tokens (created_by);
CREATE INDEX tokens_device_id ON tokens (device_id);

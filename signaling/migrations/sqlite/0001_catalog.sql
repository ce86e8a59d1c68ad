-- The hub catalog (SQLite). Timestamps are unix seconds; secrets are stored as hashes.

CREATE TABLE hub_secrets (
    name  TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);

CREATE TABLE users (
    id         TEXT PRIMARY KEY NOT NULL,   -- uuid, hyphenated lowercase
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users (id),
    secret_hash BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE INDEX api_keys_user_id ON api_keys (user_id);

CREATE TABLE devices (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    services     TEXT NOT NULL,             -- JSON array of ServiceInfo
    capabilities TEXT NOT NULL,             -- JSON array of strings
    created_at   INTEGER NOT NULL
);

CREATE TABLE device_owners (
    device_id TEXT NOT NULL REFERENCES devices (id),
    user_id   TEXT NOT NULL REFERENCES users (id),
    added_at  INTEGER NOT NULL,
    PRIMARY KEY (device_id, user_id)
);

CREATE INDEX device_owners_user_id ON device_owners (user_id);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('setup', 'share')),
    secret_hash BLOB NOT NULL,
    created_by  TEXT NOT NULL REFERENCES users (id),
    device_id   TEXT REFERENCES devices (id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT REFERENCES users (id)
);

CREATE INDEX tokens_created_by ON tokens (created_by);
CREATE INDEX tokens_device_id ON tokens (device_id);

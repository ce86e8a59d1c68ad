-- Named, scoped, expiring, revocable API keys. NULL scopes or devices mean all of them;
-- keys made before names have none.
ALTER TABLE api_keys ADD COLUMN name TEXT;
ALTER TABLE api_keys ADD COLUMN scopes TEXT;    -- JSON array of scope names
ALTER TABLE api_keys ADD COLUMN devices TEXT;   -- JSON array of device ids
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE api_keys ADD COLUMN revoked_at BIGINT;
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (user_id, name) WHERE revoked_at IS NULL;

-- A disabled user signs in nowhere and their sessions end.
ALTER TABLE users ADD COLUMN disabled_at BIGINT;

-- Every change that takes access away (a session signed out, a key revoked, a user
-- disabled or removed, a device's members changed or the device deleted), in order:
-- hubs read what is new every second, so a change made by another hub or by an admin
-- command on the hub host takes effect everywhere within a second. Old rows are pruned.
CREATE TABLE access_changes (
    seq     BIGSERIAL PRIMARY KEY,
    kind    TEXT NOT NULL CHECK (kind IN ('session', 'key', 'user', 'device')),
    subject TEXT NOT NULL,
    at      BIGINT NOT NULL
);

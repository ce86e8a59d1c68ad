-- Sessions signed out before their expiry: their JWTs are refused until then, also
-- after a restart. Rows past their expiry are pruned.
CREATE TABLE revoked_sessions (
    id         TEXT PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
);

-- A token its creator took back before anyone used it: refused from then on, and
-- listed as revoked.
ALTER TABLE tokens ADD COLUMN revoked_at BIGINT;

-- A device's members have a role: 'owner' (shares, removes members, deletes) or 'user'
-- (uses it). Everyone who owned a device before roles existed stays an owner.
ALTER TABLE device_owners ADD COLUMN role TEXT NOT NULL DEFAULT 'owner'
    CHECK (role IN ('owner', 'user'));
-- The role a share token grants; NULL on share tokens made before roles, which made
-- co-owners and still do.
ALTER TABLE tokens ADD COLUMN role TEXT CHECK (role IS NULL OR role IN ('owner', 'user'));
-- Devices their owners removed: the secret's device id is refused with that reason
-- until a setup token enrols it again.
CREATE TABLE removed_devices (
    id         TEXT PRIMARY KEY,
    removed_at BIGINT NOT NULL
);

-- Where a device is (its owner's words) and what it is built of (CPUs, RAM, GPUs), both
-- configuration: written when they change, never per heartbeat. Capabilities, still a
-- JSON array, now hold objects {protocol, version, idempotent}; older "protocol:version"
-- strings still read.
ALTER TABLE devices ADD COLUMN location TEXT;
ALTER TABLE devices ADD COLUMN hardware TEXT;   -- JSON Hardware, NULL until first reported

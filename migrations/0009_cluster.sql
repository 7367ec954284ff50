-- Several nodes on one PostgreSQL database (PROTOCOL.md 6). Portable SQL as in 0001 (the same
-- file runs on SQLite, where it only adds unused tables and a column): BIGINT times (Unix
-- milliseconds) and counters, TEXT elsewhere, no booleans.

-- The node a store was issued on or is receiving on (`[cluster] node_id`); NULL for rows
-- from before this migration. A node's start-up recovery and a takeover of a dead node only
-- touch that node's `receiving` stores.
ALTER TABLE stores ADD COLUMN node TEXT;
CREATE INDEX stores_node ON stores (node, state);

-- One lease per node. A node bumps `renewals` every lease_secs/3; the others watch the counter
-- with their own clocks (no clock comparison between machines) and, once it has not moved
-- for `lease_secs`, exactly one of them claims the node with a conditional UPDATE of
-- `taken_over_by` and finishes its stores.
CREATE TABLE nodes (
    node_id         TEXT PRIMARY KEY NOT NULL,
    http_advertise  TEXT NOT NULL,
    lease_secs      BIGINT NOT NULL,
    renewals        BIGINT NOT NULL,
    started_at      BIGINT NOT NULL,                -- this incarnation, node's clock
    renewed_at      BIGINT NOT NULL,                -- last renewal, node's clock (shown only)
    taken_over_by   TEXT,                           -- the node that finished its stores
    taken_over_at   BIGINT
);

-- SIP registrations (RFC 3261 10.3) of every node, so any node reaches a phone: through the
-- recorded Path (RFC 3327) when it registered via a proxy, else at its REGISTER's source.
CREATE TABLE registrations (
    aor          TEXT NOT NULL,                     -- user@domain
    contact_uri  TEXT NOT NULL,                     -- the Contact's URI: the binding's key
    contact      TEXT NOT NULL,                     -- the Contact value, without expires
    path         TEXT NOT NULL,                     -- Path values in order, one per line; '' = none
    transport    TEXT NOT NULL,                     -- udp | tcp | tls of the REGISTER
    source       TEXT NOT NULL,                     -- ip:port the REGISTER came from
    q            BIGINT NOT NULL,                   -- thousandths
    call_id      TEXT NOT NULL,
    cseq         BIGINT NOT NULL,
    user_agent   TEXT,
    node         TEXT NOT NULL,                     -- node that took the REGISTER
    expires_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (aor, contact_uri)
);
CREATE INDEX registrations_node ON registrations (node);

-- Secrets every node must share (the SIP digest nonce key, so a challenge from one node can
-- be answered to another behind the front proxy). Created on first use.
CREATE TABLE cluster_secrets (
    name    TEXT PRIMARY KEY NOT NULL,
    secret  TEXT NOT NULL                           -- 32 random bytes, hex
);

-- PIN lockouts (PROTOCOL.md 5) shared by every node: failures in the current window and the
-- end of a lockout, Unix milliseconds.
CREATE TABLE pin_lockouts (
    username      TEXT PRIMARY KEY NOT NULL,
    failures      BIGINT NOT NULL,
    window_start  BIGINT NOT NULL,
    locked_until  BIGINT NOT NULL
);

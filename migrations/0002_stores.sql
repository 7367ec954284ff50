-- In-call stores (PROTOCOL 2) and call recordings. Portable SQL as in 0001: BIGINT counters
-- and times (Unix milliseconds), TEXT elsewhere, no booleans.
CREATE TABLE stores (
    id              TEXT PRIMARY KEY NOT NULL,      -- st_ + base62, >= 96 random bits
    token           TEXT NOT NULL,                  -- HTTP capability for this store only
    kind            TEXT NOT NULL,                  -- in-call | call-recording
    sender          TEXT NOT NULL,                  -- AOR of the party that sends the data
    receiver        TEXT NOT NULL,                  -- AOR of the party it is stored for
    -- Account whose quota is charged; NULL = the operator (recordings of non-subscribers).
    owner           TEXT,
    call_id         TEXT,                           -- leg A's Call-ID of the call it came from
    threshold       TEXT NOT NULL,                  -- requested policy: percent:N | bytes:N | adaptive
    format          TEXT,                           -- e.g. PCMU/8000, set when the session starts
    payload_type    BIGINT,
    declared_bytes  BIGINT,                         -- Callvault-Data-Size, if given
    received_bytes  BIGINT NOT NULL DEFAULT 0,      -- RTP payload bytes stored
    reserved_bytes  BIGINT NOT NULL DEFAULT 0,      -- held on owner's quota while receiving
    threshold_bytes BIGINT,                         -- resolved threshold; NULL for adaptive
    state           TEXT NOT NULL,                  -- pending | receiving | complete | truncated | rejected | expired
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    started_at      BIGINT,
    threshold_at    BIGINT,
    finished_at     BIGINT
);
CREATE INDEX stores_sender ON stores (sender, created_at);
CREATE INDEX stores_receiver ON stores (receiver, created_at);
CREATE INDEX stores_owner ON stores (owner, created_at);
CREATE INDEX stores_state ON stores (state, expires_at);

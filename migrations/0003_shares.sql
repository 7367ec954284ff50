-- Shared data (PROTOCOL 3, 5 Shares). Portable SQL as in 0001: BIGINT sizes and times (Unix
-- milliseconds), TEXT elsewhere, no booleans.
CREATE TABLE shares (
    owner       TEXT NOT NULL,                  -- account name of the sharer
    name        TEXT NOT NULL,                  -- validated file name (manifest "name")
    content_id  TEXT NOT NULL,                  -- hex SHA-256 of the manifest bytes
    size        BIGINT NOT NULL,
    piece_size  BIGINT NOT NULL,
    pieces      BIGINT NOT NULL,
    policy      TEXT NOT NULL,                  -- public | subscribers | sip:a@x,sip:b@y
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE INDEX shares_content ON shares (content_id);
-- Key of the offer tokens (HMAC of the content id): one row, created on first use, so tokens
-- survive restarts and agree across nodes sharing the database.
CREATE TABLE share_secret (
    id      BIGINT PRIMARY KEY NOT NULL,
    secret  TEXT NOT NULL                       -- 32 random bytes, hex
);

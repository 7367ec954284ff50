-- Subscribers. Portable SQL (SQLite and PostgreSQL): BIGINT for counters, TEXT elsewhere,
-- no booleans (the sqlx Any driver cannot read SQLite booleans).
CREATE TABLE accounts (
    username       TEXT PRIMARY KEY NOT NULL,
    -- Realm the HA1 values were computed for; digest fails if sip.domain changes later.
    realm          TEXT NOT NULL,
    quota_bytes    BIGINT NOT NULL,
    used_bytes     BIGINT NOT NULL DEFAULT 0,
    reserved_bytes BIGINT NOT NULL DEFAULT 0,
    prompt_format  TEXT,
    ha1_md5        TEXT NOT NULL,
    ha1_sha256     TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    pin_hash       TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

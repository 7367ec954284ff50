-- Per-account default threshold for in-call storage (PROTOCOL.md 2.1/2.5: server, account and
-- request). Text as in stores.threshold: `percent:30`, `bytes:48000`, `adaptive`; NULL = the
-- server's `store.threshold_percent`.
ALTER TABLE accounts ADD COLUMN threshold TEXT;

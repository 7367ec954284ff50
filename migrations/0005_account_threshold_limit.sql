-- Per-account threshold limit (PROTOCOL.md 2.1 "bounded by the account's and the server's
-- limits"): byte thresholds (also resolved percentages) above this are lowered to it; it can
-- only tighten the server's `store.threshold_max_bytes`. NULL = no account limit.
ALTER TABLE accounts ADD COLUMN threshold_max_bytes BIGINT;

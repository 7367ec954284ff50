-- Whole-call recordings and real SIP in pcaps (issue 13, items 5 and the recording pcap/WAV):
-- `direction` says which way a `call-recording` store's audio flowed, 'a' = from leg A (the
-- caller) to leg B, 'b' = from leg B back to A (NULL for in-call stores and rows from before
-- this migration). `sip_remote`/`sip_local` are the SIP addresses of the session the store's
-- media came over (the far end's and callvault's, text `ip:port`), and `sip_call_id` its
-- Call-ID, so `format=pcap` rebuilds the INVITE/200 on the addresses and ports really used.
ALTER TABLE stores ADD COLUMN direction TEXT;
ALTER TABLE stores ADD COLUMN sip_remote TEXT;
ALTER TABLE stores ADD COLUMN sip_local TEXT;
ALTER TABLE stores ADD COLUMN sip_call_id TEXT;

-- The RTP addresses a store session really used (issue 13, item 5): the sender's source (from
-- the offer's SDP) and callvault's receiving address and port, written when the recorder
-- starts, so `format=pcap` carries them. NULL for uploads and rows from before this migration
-- (the pcap then uses documentation addresses). Text `ip:port` as `SocketAddr` prints it.
ALTER TABLE stores ADD COLUMN rtp_source TEXT;
ALTER TABLE stores ADD COLUMN rtp_local TEXT;

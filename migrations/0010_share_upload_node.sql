-- The node a share upload in flight runs on (`[cluster] node_id`; NULL for rows from before
-- this migration). A node's start-up recovery releases only its own uploads, and a survivor
-- that takes a dead node over releases the dead node's (PROTOCOL.md 6).
ALTER TABLE share_uploads ADD COLUMN node TEXT;

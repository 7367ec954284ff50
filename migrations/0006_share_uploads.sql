-- Share uploads in flight (issue 10, finding 6): one row per `PUT /v1/shares/...` from the
-- moment its quota is reserved until it is recorded or given up, written in the same
-- transaction as the reservation. After a crash, start-up finds the rows whose staging folder
-- (`<data_dir>/shares/.staging/<id>`) is on this node, gives their reservations back and
-- removes the folders.
CREATE TABLE share_uploads (
    id          TEXT PRIMARY KEY NOT NULL,      -- name of the staging folder
    owner       TEXT NOT NULL,                  -- account the reservation is on
    reserved    BIGINT NOT NULL,                -- bytes reserved
    started_at  BIGINT NOT NULL                 -- Unix milliseconds
);

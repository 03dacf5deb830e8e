-- What the Stitch Import API adds to a staged record. All NULL for RJMetrics pushes, whose
-- records carry their keys inside the record ("keys") and order by the server's sequence.
--   client_seq     the client's `sequence`: a stored record is replaced only by a higher one
--   key_names      the record's key fields, as a JSON array of strings
--   table_version  the full-table version the record belongs to (batch `table_version`)
--   action         NULL for an upsert; 'activate_version' for the marker that, once loaded,
--                  removes rows of older versions of the table
ALTER TABLE staged_records
    ADD COLUMN client_seq BIGINT,
    ADD COLUMN key_names TEXT,
    ADD COLUMN table_version BIGINT,
    ADD COLUMN action TEXT;

-- The JSON Schema of the newest Stitch batch per (client, table): the loader types columns by
-- it instead of guessing from values.
CREATE TABLE table_schemas (
    client_id    BIGINT NOT NULL,
    table_name   TEXT NOT NULL,
    json_schema  TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (client_id, table_name)
);

-- What the Stitch Import API adds to a staged record (see the PostgreSQL migration).
ALTER TABLE staged_records ADD COLUMN client_seq INTEGER;
ALTER TABLE staged_records ADD COLUMN key_names TEXT;
ALTER TABLE staged_records ADD COLUMN table_version INTEGER;
ALTER TABLE staged_records ADD COLUMN action TEXT;

-- The JSON Schema of the newest Stitch batch per (client, table).
CREATE TABLE table_schemas (
    client_id    INTEGER NOT NULL,
    table_name   TEXT NOT NULL,
    json_schema  TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (client_id, table_name)
);

DROP TABLE table_schemas;
ALTER TABLE staged_records
    DROP COLUMN client_seq,
    DROP COLUMN key_names,
    DROP COLUMN table_version,
    DROP COLUMN action;

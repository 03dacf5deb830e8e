DROP TABLE table_schemas;
ALTER TABLE staged_records DROP COLUMN action;
ALTER TABLE staged_records DROP COLUMN table_version;
ALTER TABLE staged_records DROP COLUMN key_names;
ALTER TABLE staged_records DROP COLUMN client_seq;

DROP TABLE staged_records;
DROP TABLE staging_sequences;
DROP TABLE api_keys;

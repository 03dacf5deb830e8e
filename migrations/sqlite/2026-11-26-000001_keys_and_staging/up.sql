-- Timestamps are RFC 3339 text in UTC (e.g. 2026-11-26T06:36:52.123456Z), which sorts correctly.

-- API keys: only an argon2id hash of the secret part is ever stored.
CREATE TABLE api_keys (
    key_id          TEXT PRIMARY KEY NOT NULL,
    client_id       INTEGER NOT NULL CHECK (client_id > 0),
    label           TEXT NOT NULL DEFAULT '',
    secret_hash     TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    last_used_at    TEXT,
    revoked_at      TEXT,
    revoked_reason  TEXT
);
CREATE INDEX api_keys_client_id ON api_keys (client_id);

-- The last sequence number handed out per (client, table).
CREATE TABLE staging_sequences (
    client_id   INTEGER NOT NULL,
    table_name  TEXT NOT NULL,
    last_seq    INTEGER NOT NULL,
    PRIMARY KEY (client_id, table_name)
);

-- Accepted records waiting for the loader, exactly as received.
CREATE TABLE staged_records (
    client_id    INTEGER NOT NULL,
    table_name   TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    received_at  TEXT NOT NULL,
    record       TEXT NOT NULL,
    PRIMARY KEY (client_id, table_name, seq)
);

-- API keys: only an argon2id hash of the secret part is ever stored.
CREATE TABLE api_keys (
    key_id          TEXT PRIMARY KEY,
    client_id       BIGINT NOT NULL CHECK (client_id > 0),
    label           TEXT NOT NULL DEFAULT '',
    secret_hash     TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    last_used_at    TIMESTAMPTZ,
    revoked_at      TIMESTAMPTZ,
    revoked_reason  TEXT
);
CREATE INDEX api_keys_client_id ON api_keys (client_id);

-- The last sequence number handed out per (client, table). Taking the row lock while a
-- push transaction is open makes sequence order equal commit order for each table.
CREATE TABLE staging_sequences (
    client_id   BIGINT NOT NULL,
    table_name  TEXT NOT NULL,
    last_seq    BIGINT NOT NULL,
    PRIMARY KEY (client_id, table_name)
);

-- Accepted records waiting for the loader, exactly as received.
CREATE TABLE staged_records (
    client_id    BIGINT NOT NULL,
    table_name   TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    record       TEXT NOT NULL,
    PRIMARY KEY (client_id, table_name, seq)
);

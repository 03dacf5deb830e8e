-- Clients whose warehouse namespace exists (schema client_<id>), so that status reports can
-- find every client's load history and rejected records.
CREATE TABLE warehouse_clients (
    client_id BIGINT PRIMARY KEY
);

-- Clients whose warehouse tables exist (named client_<id>__<table>), so that status reports
-- can find every client's load history and rejected records.
CREATE TABLE warehouse_clients (
    client_id INTEGER PRIMARY KEY NOT NULL
);

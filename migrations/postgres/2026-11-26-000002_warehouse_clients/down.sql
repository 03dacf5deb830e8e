DROP TABLE warehouse_clients;

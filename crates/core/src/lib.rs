//! Intake's shared core: configuration, the storage seam, keys, push-body validation, the
//! staging queue and analysts' reader roles. The server, the key admin CLI and the loader all
//! build on it.

pub mod db;
pub mod key_store;
pub mod keys;
pub mod push_body;
pub mod reader_roles;
pub mod settings;
pub mod staging;
pub mod table_name;
pub mod timestamps;

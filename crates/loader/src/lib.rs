//! `intake-loader`: moves staged records into typed, upserted warehouse tables.
//!
//! A pass ([`pass::run_pass`]) takes each (client, table) with staged records and loads it
//! chunk by chunk: flatten ([`flatten`]), type ([`value_types`]), name ([`identifiers`]),
//! evolve the schema ([`catalog`]), write in bulk ([`bulk`]) and remove the chunk from staging
//! in the same transaction ([`load_chunk`]).

pub mod bulk;
pub mod catalog;
pub mod cli;
pub mod dialect;
pub mod embedded;
pub mod flatten;
pub mod identifiers;
pub mod json_tree;
pub mod load_chunk;
pub mod pass;
pub mod paths;
pub mod pg_array;
pub mod pg_copy;
pub mod pg_settings;
pub mod queue;
pub mod schema_types;
pub mod share_writers;
pub mod sql;
pub mod status;
pub mod value_types;

pub use cli::main;

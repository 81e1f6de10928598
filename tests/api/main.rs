//! The integration tests, one module per concern, in one binary: a real
//! server on an ephemeral port (or the built binary, where only a process
//! shows it), a real gRPC client, and a fresh SQLite or PostgreSQL database
//! per test. `helpers` is what they share; `benches/loadgen.rs` uses it too.

#[macro_use]
mod helpers;

// The API, rule by rule.
mod accounts;
mod batch_get;
mod events;
mod get_unlink;
mod link;
mod list;
mod prepare_link;
mod validation;
mod watch;

// Adopting it: the migration's check of a database that isn't ours yet,
// and bringing the old mappings in.
mod adoption;
mod import;
mod upgrade;

// Concurrency and faults: histories the linearizability checker accepts.
mod concurrency;
mod database_errors;
mod failover;
mod faults;
mod linearizability;
mod shared_statements;
mod silent_database;

// Operating it: health, shutdown, metrics, the binary and its CLI.
mod background_tasks;
mod cli;
mod configuration;
mod deployment;
mod health;
mod metrics;
mod request_id;
mod shutdown;
mod tracing;

// Tools people debug with.
mod grpcurl;
mod reflection;

// Security: TLS, authorization, limits and hostile peers.
mod authorization;
mod database_tls;
mod hostile_input;
mod hostile_network;
mod limits;
mod tls;

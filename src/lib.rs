//! customer-mapping: the single source of truth for which Stripe customer
//! belongs to which user, served over gRPC.
//!
//! Layers, outside in: `startup` assembles everything; `grpc` (decode,
//! validate, call, map errors) calls `mappings` (what each RPC does), which
//! calls `store` (the database, PostgreSQL or SQLite); all of them speak
//! `mapping` (the domain: ids, rules, errors), which depends on none of
//! them. `import` (the `import` subcommand) reads a source and writes
//! through `store` with the domain's rules. `config`, `telemetry` and
//! `proto` are leaves every layer may use.

pub mod auth;
pub mod config;
pub mod grpc;
pub mod health;
pub mod import;
pub mod mapping;
pub mod mappings;
pub mod proto;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod transport;

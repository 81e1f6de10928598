//! customer-mapping: the single source of truth for which Stripe customer
//! belongs to which user, served over gRPC.
//!
//! Layers, outside in: `grpc` (decode, validate, call, map errors) →
//! `mapping` (the domain: ids, rules, errors) → `store` (SeaORM).
//! `import` (the `import` subcommand) reads a source and writes through
//! `store` with Link's rules.

pub mod auth;
pub mod config;
pub mod grpc;
pub mod health;
pub mod import;
pub mod mapping;
pub mod proto;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod transport;

//! customer-mapping: the single source of truth for which Stripe customer
//! belongs to which user, served over gRPC.
//!
//! Layers, outside in: `grpc` (decode, validate, call, map errors) →
//! `mapping` (the domain: ids, rules, errors) → `store` (SeaORM).

pub mod auth;
pub mod config;
pub mod grpc;
pub mod health;
pub mod mapping;
pub mod proto;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod transport;

//! Code generated from `proto/` by `build.rs`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("customermapping.v1");

/// The encoded descriptors of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("customer_mapping_descriptor");

/// The fully qualified service name, as health checks and reflection name it.
pub use customer_mapping_server::SERVICE_NAME;

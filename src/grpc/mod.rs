//! The gRPC layer: decode and validate requests, call the domain, encode
//! replies. Status codes are chosen in `status.rs` only.
//!
//! - `service`: the `CustomerMapping` implementation, one thin handler per RPC.
//! - `request`: request messages to validated domain arguments;
//!   `bulk_request` for BatchGet, List and ListEvents, with `page_token`.
//! - `convert`: domain values to proto messages.
//! - `decode`: a request's bytes through decoding and validation, for the fuzzer.
//! - `guard`: authorization, load shedding and the deadline, before a handler runs.
//! - `watch`: Watch's cursors and its response stream.
//! - `observe`: what wraps every call (request id, log line, metrics), around the guard.

mod bulk_request;
pub mod codec;
mod convert;
mod decode;
mod guard;
pub mod limits;
mod observe;
mod page_token;
mod request;
mod service;
pub mod status;
mod watch;

pub use decode::decode_and_validate;
pub use guard::{Guard, reflection_interceptor};
pub use observe::REQUEST_ID;
pub use proto::customer_mapping_server::CustomerMappingServer;
pub use service::CustomerMappingService;

use crate::proto;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::auth::Rpc;

    /// `Rpc::ALL` is the service's method list, in the proto's order.
    #[test]
    fn every_rpc_of_the_proto_is_in_rpc_all() {
        let files = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let methods: Vec<String> = files
            .file
            .iter()
            .filter(|f| f.package() == "customermapping.v1")
            .flat_map(|f| &f.service)
            .filter(|s| format!("customermapping.v1.{}", s.name()) == proto::SERVICE_NAME)
            .flat_map(|s| &s.method)
            .map(|m| m.name().to_owned())
            .collect();
        let listed: Vec<&str> = Rpc::ALL.iter().map(|rpc| rpc.name()).collect();
        assert_eq!(methods, listed);
    }
}

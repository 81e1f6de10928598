//! The fuzz entry: a request's bytes through everything the server does
//! before the database, for every RPC.

use tonic::Status;

use super::{
    bulk_request::{batch_get_keys, list_arguments, list_events_arguments},
    codec,
    request::{get_key, link_arguments, prepare_link_arguments, unlink_arguments},
    watch::watch_start,
};
use crate::auth::Rpc;

/// Everything the server does with a request's bytes before the database:
/// decode as the method's message, then validate. For the fuzz harness
/// (`fuzz/`, and `tests/api/hostile_input.rs`), which checks that no input
/// panics it and that every refusal is INVALID_ARGUMENT.
pub fn decode_and_validate(method: Rpc, bytes: &[u8]) -> Result<(), Status> {
    match method {
        Rpc::Link => link_arguments(codec::decode_request(bytes)?).map(drop),
        Rpc::PrepareLink => prepare_link_arguments(codec::decode_request(bytes)?).map(drop),
        Rpc::Get => get_key(codec::decode_request(bytes)?).map(drop),
        Rpc::Unlink => unlink_arguments(codec::decode_request(bytes)?).map(drop),
        Rpc::BatchGet => batch_get_keys(&codec::decode_request(bytes)?).map(drop),
        Rpc::List => list_arguments(&codec::decode_request(bytes)?).map(drop),
        Rpc::ListEvents => list_events_arguments(&codec::decode_request(bytes)?).map(drop),
        // A cursor is checked against the database's deployment id, which
        // needs the database: here, any deployment's.
        Rpc::Watch => watch_start(&codec::decode_request(bytes)?, "fuzz").map(drop),
    }
    .map_err(Status::from)
}

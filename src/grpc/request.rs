//! Request messages to validated domain arguments: every bad field is
//! reported at once, named as in the proto.

use tonic::Status;

use super::bulk_request::{batch_get_keys, list_arguments, list_events_arguments};
use super::codec;
use crate::auth::Rpc;
use crate::mapping::{Error, FieldViolation, InvalidId, Key, StripeCustomerId, UserId};
use crate::proto::{self, GetRequest, LinkRequest, UnlinkRequest};

/// Validates both fields so the caller learns every mistake at once.
pub(super) fn link_arguments(request: LinkRequest) -> Result<(UserId, StripeCustomerId), Error> {
    match (
        parse("user_id", UserId::parse(request.user_id)),
        parse(
            "stripe_customer_id",
            StripeCustomerId::parse(request.stripe_customer_id),
        ),
    ) {
        (Ok(user), Ok(customer)) => Ok((user, customer)),
        (user, customer) => Err(Error::InvalidArgument(
            [user.err(), customer.err()].into_iter().flatten().collect(),
        )),
    }
}

pub(super) fn get_key(request: GetRequest) -> Result<Key, Error> {
    match request.key {
        Some(proto::get_request::Key::UserId(id)) => user_key(id),
        Some(proto::get_request::Key::StripeCustomerId(id)) => customer_key(id),
        None => Err(missing_key()),
    }
    .map_err(|v| Error::InvalidArgument(vec![v]))
}

pub(super) fn unlink_key(request: UnlinkRequest) -> Result<Key, Error> {
    match request.key {
        Some(proto::unlink_request::Key::UserId(id)) => user_key(id),
        Some(proto::unlink_request::Key::StripeCustomerId(id)) => customer_key(id),
        None => Err(missing_key()),
    }
    .map_err(|v| Error::InvalidArgument(vec![v]))
}

/// Everything the server does with a request's bytes before the database:
/// decode as the method's message, then validate. For the fuzz harness
/// (`fuzz/`, and `tests/api/hostile_input.rs`), which checks that no input panics it and that
/// every refusal is INVALID_ARGUMENT.
pub fn decode_and_validate(method: Rpc, bytes: &[u8]) -> Result<(), Status> {
    match method {
        Rpc::Link => link_arguments(codec::decode_request(bytes)?).map(drop),
        Rpc::Get => get_key(codec::decode_request(bytes)?).map(drop),
        Rpc::Unlink => unlink_key(codec::decode_request(bytes)?).map(drop),
        Rpc::BatchGet => batch_get_keys(&codec::decode_request(bytes)?).map(drop),
        Rpc::List => list_arguments(&codec::decode_request(bytes)?).map(drop),
        Rpc::ListEvents => list_events_arguments(&codec::decode_request(bytes)?).map(drop),
    }
    .map_err(Status::from)
}

fn parse<T>(field: &'static str, parsed: Result<T, InvalidId>) -> Result<T, FieldViolation> {
    parsed.map_err(|e| FieldViolation {
        field: field.into(),
        description: e.to_string(),
    })
}

pub(super) fn user_key(raw: String) -> Result<Key, FieldViolation> {
    parse("user_id", UserId::parse(raw)).map(Key::User)
}

pub(super) fn customer_key(raw: String) -> Result<Key, FieldViolation> {
    parse("stripe_customer_id", StripeCustomerId::parse(raw)).map(Key::Customer)
}

fn missing_key() -> FieldViolation {
    FieldViolation {
        field: "key".into(),
        description: "exactly one of user_id or stripe_customer_id must be set".into(),
    }
}

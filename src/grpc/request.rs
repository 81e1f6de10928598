//! Request messages to validated domain arguments: every bad field is
//! reported at once, named as in the proto.

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

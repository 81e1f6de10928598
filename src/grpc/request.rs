//! Request messages to validated domain arguments: every bad field is
//! reported at once, named as in the proto.

use crate::mapping::{Error, FieldViolation, InvalidId, Key, StripeCustomerId, Unlink, UserId};
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

/// The key, and the expected counterpart when set: a customer id when the
/// key is a user, a user id when it is a customer.
pub(super) fn unlink_arguments(request: UnlinkRequest) -> Result<Unlink, Error> {
    let expected = Some(request.expected_counterpart).filter(|id| !id.is_empty());
    let (unlink, counterpart_err) = match request.key {
        Some(proto::unlink_request::Key::UserId(id)) => {
            let expected = expected.map(|id| parse(FIELD_COUNTERPART, StripeCustomerId::parse(id)));
            let (expected, err) = split(expected);
            (user_id(id).map(|user| Unlink::of_user(user, expected)), err)
        }
        Some(proto::unlink_request::Key::StripeCustomerId(id)) => {
            let expected = expected.map(|id| parse(FIELD_COUNTERPART, UserId::parse(id)));
            let (expected, err) = split(expected);
            (
                customer_id(id).map(|customer| Unlink::of_customer(customer, expected)),
                err,
            )
        }
        None => (Err(missing_key()), None),
    };
    match (unlink, counterpart_err) {
        (Ok(unlink), None) => Ok(unlink),
        (unlink, counterpart_err) => Err(Error::InvalidArgument(
            [unlink.err(), counterpart_err]
                .into_iter()
                .flatten()
                .collect(),
        )),
    }
}

/// An optional parsed field as its value and its violation.
fn split<T>(field: Option<Result<T, FieldViolation>>) -> (Option<T>, Option<FieldViolation>) {
    match field {
        Some(Ok(value)) => (Some(value), None),
        Some(Err(violation)) => (None, Some(violation)),
        None => (None, None),
    }
}

const FIELD_COUNTERPART: &str = "expected_counterpart";

fn parse<T>(field: &'static str, parsed: Result<T, InvalidId>) -> Result<T, FieldViolation> {
    parsed.map_err(|e| FieldViolation {
        field: field.into(),
        description: e.to_string(),
    })
}

pub(super) fn user_key(raw: String) -> Result<Key, FieldViolation> {
    user_id(raw).map(Key::User)
}

pub(super) fn customer_key(raw: String) -> Result<Key, FieldViolation> {
    customer_id(raw).map(Key::Customer)
}

fn user_id(raw: String) -> Result<UserId, FieldViolation> {
    parse("user_id", UserId::parse(raw))
}

fn customer_id(raw: String) -> Result<StripeCustomerId, FieldViolation> {
    parse("stripe_customer_id", StripeCustomerId::parse(raw))
}

fn missing_key() -> FieldViolation {
    FieldViolation {
        field: "key".into(),
        description: "exactly one of user_id or stripe_customer_id must be set".into(),
    }
}

//! Request messages to validated domain arguments: every bad field is
//! reported at once, named as in the proto.

use crate::mapping::{
    Error, FieldViolation, Generation, InvalidId, Key, LinkArgs, Side, StripeAccount,
    StripeCustomerId, Unlink, UserId,
};
use crate::proto::{self, GetRequest, LinkRequest, PrepareLinkRequest, UnlinkRequest};

/// Validates every field so the caller learns every mistake at once.
pub(super) fn link_arguments(request: LinkRequest) -> Result<LinkArgs, Error> {
    let prepared = request.prepared_generation.map(|raw| {
        Generation::new(raw).ok_or_else(|| FieldViolation {
            field: "prepared_generation".into(),
            description: format!("must not be negative, got {raw}"),
        })
    });
    let (prepared, prepared_err) = split(prepared);
    match (
        user_id(request.user_id),
        customer_id(request.stripe_customer_id),
        account("stripe_account", request.stripe_account),
        prepared_err,
    ) {
        (Ok(user_id), Ok(stripe_customer_id), Ok(stripe_account), None) => Ok(LinkArgs {
            user_id,
            stripe_customer_id,
            stripe_account,
            prepared,
        }),
        (user, customer, account, prepared) => Err(invalid([
            user.err(),
            customer.err(),
            account.err(),
            prepared,
        ])),
    }
}

/// PrepareLink's account and user.
pub(super) fn prepare_link_arguments(
    request: PrepareLinkRequest,
) -> Result<(StripeAccount, UserId), Error> {
    match (
        user_id(request.user_id),
        account("stripe_account", request.stripe_account),
    ) {
        (Ok(user), Ok(account)) => Ok((account, user)),
        (user, account) => Err(invalid([user.err(), account.err()])),
    }
}

pub(super) fn get_key(request: GetRequest) -> Result<Key, Error> {
    let side = match request.key {
        Some(proto::get_request::Key::UserId(id)) => user_id(id).map(Side::User),
        Some(proto::get_request::Key::StripeCustomerId(id)) => customer_id(id).map(Side::Customer),
        None => Err(missing_key("key")),
    };
    match (side, account("stripe_account", request.stripe_account)) {
        (Ok(side), Ok(account)) => Ok(Key { account, side }),
        (side, account) => Err(invalid([side.err(), account.err()])),
    }
}

/// The key, and the expected counterpart when set: a customer id when the
/// key is a user, a user id when it is a customer.
pub(super) fn unlink_arguments(request: UnlinkRequest) -> Result<Unlink, Error> {
    let expected = Some(request.expected_counterpart).filter(|id| !id.is_empty());
    let account = account("stripe_account", request.stripe_account);
    match request.key {
        Some(proto::unlink_request::Key::UserId(id)) => unlink_of(
            user_id(id),
            account,
            expected.map(|id| parse(FIELD_COUNTERPART, StripeCustomerId::parse(id))),
            Unlink::of_user,
        ),
        Some(proto::unlink_request::Key::StripeCustomerId(id)) => unlink_of(
            customer_id(id),
            account,
            expected.map(|id| parse(FIELD_COUNTERPART, UserId::parse(id))),
            Unlink::of_customer,
        ),
        None => Err(invalid([Some(missing_key("key")), account.err()])),
    }
}

/// An Unlink of one side (`of`), or every violation among its fields.
fn unlink_of<S, C>(
    side: Result<S, FieldViolation>,
    account: Result<StripeAccount, FieldViolation>,
    expected: Option<Result<C, FieldViolation>>,
    of: fn(StripeAccount, S, Option<C>) -> Unlink,
) -> Result<Unlink, Error> {
    match (side, account, split(expected)) {
        (Ok(side), Ok(account), (expected, None)) => Ok(of(account, side, expected)),
        (side, account, (_, expected)) => Err(invalid([side.err(), account.err(), expected])),
    }
}

/// Every violation found, as one error.
fn invalid<const N: usize>(violations: [Option<FieldViolation>; N]) -> Error {
    Error::InvalidArgument(violations.into_iter().flatten().collect())
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

fn parse<T>(
    field: impl Into<std::borrow::Cow<'static, str>>,
    parsed: Result<T, InvalidId>,
) -> Result<T, FieldViolation> {
    parsed.map_err(|e| FieldViolation {
        field: field.into(),
        description: e.to_string(),
    })
}

pub(super) fn user_id(raw: String) -> Result<UserId, FieldViolation> {
    parse("user_id", UserId::parse(raw))
}

pub(super) fn customer_id(raw: String) -> Result<StripeCustomerId, FieldViolation> {
    parse("stripe_customer_id", StripeCustomerId::parse(raw))
}

/// A Stripe account, the field named `field`.
pub(super) fn account(
    field: impl Into<std::borrow::Cow<'static, str>>,
    raw: String,
) -> Result<StripeAccount, FieldViolation> {
    parse(field, StripeAccount::parse(raw))
}

pub(super) fn missing_key(field: impl Into<std::borrow::Cow<'static, str>>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: "exactly one of user_id or stripe_customer_id must be set".into(),
    }
}

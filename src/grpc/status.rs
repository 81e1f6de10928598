//! The one place where domain errors become gRPC status codes.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    auth::AuthError,
    mapping::{Error, Mapping, Side, StripeAccount},
};

/// `google.rpc.ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "customermapping.v1";

pub const REASON_USER_ALREADY_LINKED: &str = "USER_ALREADY_LINKED";
pub const REASON_CUSTOMER_ALREADY_LINKED: &str = "CUSTOMER_ALREADY_LINKED";
pub const REASON_MAPPING_NOT_FOUND: &str = "MAPPING_NOT_FOUND";
pub const REASON_MAPPING_CHANGED: &str = "MAPPING_CHANGED";
pub const REASON_CALLER_NOT_ALLOWED: &str = "CALLER_NOT_ALLOWED";
pub const REASON_STALE_PREPARATION: &str = "STALE_PREPARATION";
pub const REASON_STRIPE_ACCOUNTS_NOT_ENABLED: &str = "STRIPE_ACCOUNTS_NOT_ENABLED";

/// ErrorInfo metadata keys (lowerCamelCase, as AIP-193 asks).
pub const METADATA_USER_ID: &str = "userId";
pub const METADATA_STRIPE_CUSTOMER_ID: &str = "stripeCustomerId";
pub const METADATA_STRIPE_ACCOUNT: &str = "stripeAccount";
pub const METADATA_PREPARED_GENERATION: &str = "preparedGeneration";
pub const METADATA_GENERATION: &str = "generation";
pub const METADATA_CALLER: &str = "caller";
pub const METADATA_METHOD: &str = "method";

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let violations: Vec<FieldViolation> = violations
                    .into_iter()
                    .map(|v| FieldViolation::new(v.field, v.description))
                    .collect();
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {message}"),
                    ErrorDetails::with_bad_request(violations),
                )
            }
            Error::UserAlreadyLinked(existing) => naming(
                Code::AlreadyExists,
                REASON_USER_ALREADY_LINKED,
                "user is already linked to another Stripe customer",
                &existing,
            ),
            Error::CustomerAlreadyLinked(existing) => naming(
                Code::AlreadyExists,
                REASON_CUSTOMER_ALREADY_LINKED,
                "Stripe customer is already linked to another user",
                &existing,
            ),
            Error::MappingChanged(current) => naming(
                Code::FailedPrecondition,
                REASON_MAPPING_CHANGED,
                "the key is linked to another counterpart than expected; nothing was removed",
                &current,
            ),
            Error::StalePreparation {
                user,
                account,
                prepared,
                current,
            } => Status::with_error_details(
                Code::FailedPrecondition,
                "the user was unlinked since PrepareLink: nothing was written; the customer \
                 created with that preparation is an orphan, prepare again",
                ErrorDetails::with_error_info(
                    REASON_STALE_PREPARATION,
                    ERROR_DOMAIN,
                    in_account(
                        &account,
                        [
                            (METADATA_USER_ID.to_owned(), user.into()),
                            (
                                METADATA_PREPARED_GENERATION.to_owned(),
                                prepared.count().to_string(),
                            ),
                            (METADATA_GENERATION.to_owned(), current.count().to_string()),
                        ],
                    ),
                ),
            ),
            Error::AccountsNotEnabled => Status::with_error_details(
                Code::FailedPrecondition,
                "mappings of connected Stripe accounts are not enabled on this database yet: \
                 once every replica runs this release, run `customer-mapping migrate \
                 --enable-stripe-accounts`",
                ErrorDetails::with_error_info(
                    REASON_STRIPE_ACCOUNTS_NOT_ENABLED,
                    ERROR_DOMAIN,
                    HashMap::new(),
                ),
            ),
            Error::NotFound(key) => {
                let (field, id) = match key.side {
                    Side::User(id) => (METADATA_USER_ID, String::from(id)),
                    Side::Customer(id) => (METADATA_STRIPE_CUSTOMER_ID, String::from(id)),
                };
                let metadata = in_account(&key.account, [(field.to_owned(), id)]);
                Status::with_error_details(
                    Code::NotFound,
                    "no mapping for this key",
                    ErrorDetails::with_error_info(REASON_MAPPING_NOT_FOUND, ERROR_DOMAIN, metadata),
                )
            }
            Error::Contended => {
                Status::aborted("the mapping was changed concurrently too many times; retry")
            }
            Error::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                Status::unavailable("database unavailable; retry with backoff")
            }
            Error::TooManyWatchers => Status::resource_exhausted(
                "this server serves its maximum number of Watch streams; try another replica or later",
            ),
            Error::ShuttingDown => Status::unavailable(
                "the server is shutting down; resume from your last cursor on another replica",
            ),
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Unauthenticated(why) => Status::unauthenticated(why),
            AuthError::PermissionDenied { caller, method } => Status::with_error_details(
                Code::PermissionDenied,
                format!("caller {caller} may not call {method}"),
                ErrorDetails::with_error_info(
                    REASON_CALLER_NOT_ALLOWED,
                    ERROR_DOMAIN,
                    HashMap::from([
                        (METADATA_CALLER.to_owned(), caller.to_string()),
                        (METADATA_METHOD.to_owned(), method.to_owned()),
                    ]),
                ),
            ),
        }
    }
}

/// More calls in progress than the server takes: shed at once rather than
/// queued, so overload can't grow a queue without bound.
pub fn overloaded() -> Status {
    Status::unavailable("server overloaded; retry with backoff")
}

/// The server's default deadline passed (the caller set none, or a longer
/// one). Whether the change was made is unknown, as for any deadline.
pub fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call took longer than the server's deadline")
}

/// The request bytes are not a valid message of the method's type.
pub fn undecodable(why: &str) -> Status {
    Status::invalid_argument(format!("the request is not a valid message: {why}"))
}

/// The request message is larger than `MAX_REQUEST_BYTES`.
pub fn request_too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the request message is larger than the {limit}-byte limit"
    ))
}

/// ErrorInfo metadata about a key or mapping of `account`: `stripeAccount`
/// names a connected account and is absent for the platform's own, so a
/// caller that names no account gets exactly the metadata it got before
/// accounts existed.
fn in_account<const N: usize>(
    account: &StripeAccount,
    entries: [(String, String); N],
) -> HashMap<String, String> {
    let mut metadata = HashMap::from(entries);
    if !account.is_platform() {
        metadata.insert(
            METADATA_STRIPE_ACCOUNT.to_owned(),
            account.as_str().to_owned(),
        );
    }
    metadata
}

/// An error naming a mapping in its ErrorInfo: the one in the way.
fn naming(code: Code, reason: &str, message: &str, existing: &Mapping) -> Status {
    let metadata = in_account(
        &existing.stripe_account,
        [
            (
                METADATA_USER_ID.to_owned(),
                existing.user_id.as_str().to_owned(),
            ),
            (
                METADATA_STRIPE_CUSTOMER_ID.to_owned(),
                existing.stripe_customer_id.as_str().to_owned(),
            ),
        ],
    );
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

use std::borrow::Cow;

use super::{Generation, Key, Mapping, StripeAccount, UserId};

/// A field the caller got wrong, named as in the proto (`keys[3].user_id`
/// for an element of a repeated field, hence not always static).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: Cow<'static, str>,
    pub description: String,
}

/// Everything that can go wrong in the domain. The gRPC layer turns each
/// variant into exactly one status code; nothing else chooses codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),

    /// The user is already linked to another customer; carries that mapping.
    #[error("user is already linked to another Stripe customer")]
    UserAlreadyLinked(Mapping),

    /// The customer is already linked to another user; carries that mapping.
    #[error("Stripe customer is already linked to another user")]
    CustomerAlreadyLinked(Mapping),

    /// Unlink expected another mapping: this one holds the key now, and
    /// nothing was removed.
    #[error("the mapping changed since the caller saw it")]
    MappingChanged(Mapping),

    /// A Link that followed a PrepareLink at generation `prepared`, while
    /// the user has been unlinked since and is at `current`: nothing was
    /// written.
    #[error("the preparation is stale: the user was unlinked since")]
    StalePreparation {
        user: UserId,
        account: StripeAccount,
        prepared: Generation,
        current: Generation,
    },

    /// A connected account was named while the database still holds the
    /// previous release's global uniqueness (the upgrade's last step has
    /// not run).
    #[error("Stripe accounts are not enabled on this database yet")]
    AccountsNotEnabled,

    /// No mapping holds this key.
    #[error("mapping not found")]
    NotFound(Key),

    /// Link lost every bounded retry to concurrent Link/Unlink calls on the
    /// same keys. Nothing was written; the caller may retry.
    #[error("too much concurrent modification of the same mapping")]
    Contended,

    /// The database is unreachable, saturated or busy. Nothing is known to
    /// have been written; the caller may retry.
    #[error("database unavailable")]
    Unavailable(#[source] BoxError),

    /// The server already serves as many Watch streams as it may.
    #[error("too many watchers")]
    TooManyWatchers,

    /// The server is shutting down: the call may go to another replica
    /// (a Watch resumes there from its last cursor).
    #[error("the server is shutting down")]
    ShuttingDown,

    /// Anything else. The source is for the log, never for the caller.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

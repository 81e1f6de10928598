//! The domain: what a mapping is, its validated ids, the rules a Link
//! follows, the audit trail's events and the errors a caller can see.
//! Knows nothing of gRPC or of the database.

mod actor;
mod audit;
mod bulk;
mod error;
mod ids;
mod link;
mod prepare;
mod unlink;

use chrono::{DateTime, Utc};

pub use actor::Actor;
pub use audit::{Event, EventKind, EventsPage};
pub use bulk::{DEFAULT_PAGE_SIZE, ListCursor, ListPage, MAX_BATCH_KEYS, MAX_PAGE_SIZE};
pub use error::{BoxError, Error, FieldViolation};
pub use ids::{InvalidId, MAX_ID_CHARS, StripeAccount, StripeCustomerId, UserId};
pub use link::{
    Holder, KeyFingerprints, KeySet, LinkArgs, LinkAttempt, LinkKeys, LinkOutcome, LinkToken,
    LinkWrite, PassThrough,
};
pub use prepare::{Generation, IdempotencyNamespace, Preparation, PrepareOutcome, Prepared};
pub use unlink::{Unlink, Unlinked};

/// One user linked to one Stripe customer, in one Stripe account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub user_id: UserId,
    pub stripe_customer_id: StripeCustomerId,
    pub stripe_account: StripeAccount,
    pub created_at: DateTime<Utc>,
}

/// The outcome of a successful Link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub mapping: Mapping,
    /// True when this call created the mapping, false when it already existed.
    pub created: bool,
}

/// Either side of a mapping in a Stripe account: what a mapping is found or
/// removed by. The bijection holds within an account, so a side alone
/// names no mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub account: StripeAccount,
    pub side: Side,
}

/// One side of a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Side {
    User(UserId),
    Customer(StripeCustomerId),
}

impl Key {
    pub fn user(account: StripeAccount, id: UserId) -> Self {
        Self {
            account,
            side: Side::User(id),
        }
    }

    pub fn customer(account: StripeAccount, id: StripeCustomerId) -> Self {
        Self {
            account,
            side: Side::Customer(id),
        }
    }
}

impl Side {
    /// The id, as stored.
    pub fn as_str(&self) -> &str {
        match self {
            Side::User(id) => id.as_str(),
            Side::Customer(id) => id.as_str(),
        }
    }
}

impl Mapping {
    /// Whether this mapping holds `key`.
    pub fn holds(&self, key: &Key) -> bool {
        self.stripe_account == key.account
            && match &key.side {
                Side::User(id) => self.user_id == *id,
                Side::Customer(id) => self.stripe_customer_id == *id,
            }
    }

    /// Its user's key and its customer's.
    pub fn keys(&self) -> [Key; 2] {
        let account = &self.stripe_account;
        [
            Key::user(account.clone(), self.user_id.clone()),
            Key::customer(account.clone(), self.stripe_customer_id.clone()),
        ]
    }
}

//! The domain: what a mapping is, its validated ids, the rules a Link
//! follows, the audit trail's events and the errors a caller can see.
//! Knows nothing of gRPC or of the database.

mod actor;
mod audit;
mod bulk;
mod error;
mod ids;
mod link;
mod unlink;

use chrono::{DateTime, Utc};

pub use actor::Actor;
pub use audit::{Event, EventKind, EventsPage};
pub use bulk::{DEFAULT_PAGE_SIZE, ListCursor, ListPage, MAX_BATCH_KEYS, MAX_PAGE_SIZE};
pub use error::{BoxError, Error, FieldViolation};
pub use ids::{InvalidId, MAX_ID_CHARS, StripeCustomerId, UserId};
pub use link::{
    Holder, KeyFingerprints, KeySet, LinkAttempt, LinkKeys, LinkOutcome, LinkToken, LinkWrite,
    PassThrough,
};
pub use unlink::{Unlink, Unlinked};

/// One user linked to one Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub user_id: UserId,
    pub stripe_customer_id: StripeCustomerId,
    pub created_at: DateTime<Utc>,
}

/// The outcome of a successful Link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub mapping: Mapping,
    /// True when this call created the mapping, false when it already existed.
    pub created: bool,
}

/// Either side of a mapping, to find or remove it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    User(UserId),
    Customer(StripeCustomerId),
}

impl Mapping {
    /// Whether this mapping holds `key`.
    pub fn holds(&self, key: &Key) -> bool {
        match key {
            Key::User(id) => self.user_id == *id,
            Key::Customer(id) => self.stripe_customer_id == *id,
        }
    }
}

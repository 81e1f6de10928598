//! What Unlink removes, and what its caller learns when it removes nothing.

use super::{Error, Key, Mapping, Side, StripeAccount, StripeCustomerId, UserId};

/// An Unlink: the mapping holding `key`; with `expected_counterpart` (the
/// other side's id), only while it still pairs `key` with exactly that id.
/// A caller that saw a mapping removes that mapping, never one linked
/// again since by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlink {
    key: Key,
    expected_counterpart: Option<Side>,
}

impl Unlink {
    /// The mapping of `user`; with `expected`, only while it is that customer.
    pub fn of_user(
        account: StripeAccount,
        user: UserId,
        expected: Option<StripeCustomerId>,
    ) -> Self {
        Self {
            key: Key::user(account, user),
            expected_counterpart: expected.map(Side::Customer),
        }
    }

    /// The mapping of `customer`; with `expected`, only while it is that user.
    pub fn of_customer(
        account: StripeAccount,
        customer: StripeCustomerId,
        expected: Option<UserId>,
    ) -> Self {
        Self {
            key: Key::customer(account, customer),
            expected_counterpart: expected.map(Side::User),
        }
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The other side's id a removed mapping must hold, if any.
    pub fn expected_counterpart(&self) -> Option<&Side> {
        self.expected_counterpart.as_ref()
    }
}

/// What an Unlink found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlinked {
    /// Removed, with its event.
    Removed(Mapping),
    /// Another mapping holds the key (only with an expected counterpart):
    /// nothing was removed.
    Kept(Mapping),
    /// No mapping holds the key.
    Absent,
}

impl Unlinked {
    /// The caller's answer: the mapping removed, or why none was.
    pub fn answer(self, unlink: &Unlink) -> Result<Mapping, Error> {
        match self {
            Unlinked::Removed(mapping) => Ok(mapping),
            Unlinked::Kept(current) => Err(Error::MappingChanged(current)),
            Unlinked::Absent => Err(Error::NotFound(unlink.key.clone())),
        }
    }
}

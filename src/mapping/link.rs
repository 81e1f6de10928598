//! Link's rules: the token that marks a call's own row, what an attempt's
//! findings mean, and which Links may share one statement. The store
//! carries attempts out; why an attempt's findings are the state at one
//! instant is argued once, in `store/postgres/link.rs`.

use std::{
    collections::HashSet,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
};

use chrono::{DateTime, Utc};

use super::{Actor, Generation, Key, Mapping, StripeAccount, StripeCustomerId, UserId};

/// What a caller asks Link for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkArgs {
    pub user_id: UserId,
    pub stripe_customer_id: StripeCustomerId,
    pub stripe_account: StripeAccount,
    /// The generation of the PrepareLink this Link follows, if any.
    pub prepared: Option<Generation>,
}

/// Marks the rows one Link call (or one import batch) inserts. An attempt
/// that finds its pair already linked under its own token is looking at an
/// earlier attempt of the same call whose answer was lost: that is a
/// creation, not a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkToken(i64);

impl LinkToken {
    /// 64 random bits: two calls drawing the same token for the same pair,
    /// one of them retrying, is not a concern.
    pub fn random() -> Self {
        let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
        Self(high as i64)
    }

    /// The token as stored.
    pub fn from_stored(raw: i64) -> Self {
        Self(raw)
    }

    pub fn stored(self) -> i64 {
        self.0
    }
}

/// What a Link writes if its pair is free: the mapping, the token marking
/// its row, and what the audit trail records with it.
#[derive(Debug, Clone)]
pub struct LinkWrite {
    pub mapping: Mapping,
    pub token: LinkToken,
    /// The event's time: the mapping's creation for a Link, the import's
    /// time for an imported mapping.
    pub time: DateTime<Utc>,
    pub actor: Actor,
    /// The generation of the PrepareLink this Link follows, if any: the
    /// Link writes nothing unless the user is still at it.
    pub prepared: Option<Generation>,
}

impl LinkWrite {
    /// The user and the customer it links, in its account.
    pub fn keys(&self) -> [Key; 2] {
        self.mapping.keys()
    }
}

/// A mapping found holding the user or the customer of a Link, with the
/// token of the Link that created it (none for rows written otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub mapping: Mapping,
    pub token: Option<LinkToken>,
}

/// What one attempt at a Link found, as the store reports it.
#[derive(Debug)]
pub enum LinkAttempt {
    /// This attempt inserted the mapping.
    Inserted(Mapping),
    /// The insert did nothing; these mappings held the user or the customer
    /// at one instant during the attempt. Empty when the mapping it
    /// conflicted with was committed after that instant, or unlinked.
    Holders(Vec<Holder>),
    /// The database aborted the attempt (nothing was written) or its
    /// connection was lost (the next attempt, with the same token, finds
    /// out).
    Again,
    /// The Link followed a preparation and the user has been unlinked
    /// since: it is at this generation now. Nothing was written.
    Stale(Generation),
}

/// Link's answer, decided from one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    /// This call created the mapping (in this attempt or an earlier one).
    Created(Mapping),
    /// The pair was already linked.
    Present(Mapping),
    /// The user is linked to another customer.
    UserConflict(Mapping),
    /// The customer is linked to another user.
    CustomerConflict(Mapping),
    /// The preparation is stale: the user is at this generation now.
    Stale(Generation),
    /// No answer is justified yet: run the attempt again.
    Undecided,
}

impl LinkAttempt {
    /// Link's decision for `write` from what this attempt found. A mapping
    /// holding the user decides first: that is the question a caller
    /// linking a user asks ("who is my customer?").
    pub fn outcome(self, write: &LinkWrite) -> LinkOutcome {
        let holders = match self {
            LinkAttempt::Inserted(mapping) => return LinkOutcome::Created(mapping),
            LinkAttempt::Again => return LinkOutcome::Undecided,
            LinkAttempt::Stale(now) => return LinkOutcome::Stale(now),
            LinkAttempt::Holders(holders) => holders,
        };
        let wanted = &write.mapping;
        if let Some(holder) = holders.iter().find(|h| h.mapping.user_id == wanted.user_id) {
            let mapping = holder.mapping.clone();
            return if mapping.stripe_customer_id != wanted.stripe_customer_id {
                LinkOutcome::UserConflict(mapping)
            } else if holder.token == Some(write.token) {
                LinkOutcome::Created(mapping)
            } else {
                LinkOutcome::Present(mapping)
            };
        }
        match holders
            .into_iter()
            .find(|h| h.mapping.stripe_customer_id == wanted.stripe_customer_id)
        {
            Some(holder) => LinkOutcome::CustomerConflict(holder.mapping),
            None => LinkOutcome::Undecided,
        }
    }
}

/// The keys of one Link, as fingerprints of its user and its customer in
/// its account: users and customers are hashed apart, so that a user id
/// equal to a customer id is another key, and so are accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkKeys {
    user: u64,
    customer: u64,
}

/// Fingerprints keys with a key of its own (random per instance).
#[derive(Debug, Default)]
pub struct KeyFingerprints(RandomState);

impl KeyFingerprints {
    pub fn of(&self, account: &str, user_id: &str, stripe_customer_id: &str) -> LinkKeys {
        LinkKeys {
            user: self.0.hash_one((0u8, account, user_id)),
            customer: self.0.hash_one((1u8, account, stripe_customer_id)),
        }
    }

    /// A fingerprint of the pair itself, in its account.
    pub fn pair(&self, account: &str, user_id: &str, stripe_customer_id: &str) -> u64 {
        self.0.hash_one((2u8, account, user_id, stripe_customer_id))
    }
}

/// The keys of Links that go into one statement, or that are in flight.
///
/// The batching rule: **no two Links of one statement share a user or a
/// customer in one account.** Each is then decided against mappings outside
/// the statement, exactly as if it were alone. A fingerprint collision only
/// makes a Link wait for the next statement.
#[derive(Debug, Default)]
pub struct KeySet(HashSet<u64, BuildHasherDefault<PassThrough>>);

impl KeySet {
    /// Whether a Link with `keys` may join: neither key is taken.
    pub fn admits(&self, keys: LinkKeys) -> bool {
        !self.0.contains(&keys.user) && !self.0.contains(&keys.customer)
    }

    pub fn add(&mut self, keys: LinkKeys) {
        self.0.insert(keys.user);
        self.0.insert(keys.customer);
    }

    pub fn remove(&mut self, keys: LinkKeys) {
        self.0.remove(&keys.user);
        self.0.remove(&keys.customer);
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// Fingerprints are already uniform hashes: hash them no further.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 fingerprints are hashed with this; fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{StripeAccount, StripeCustomerId, UserId};

    fn mapping(user: &str, customer: &str) -> Mapping {
        Mapping {
            user_id: UserId::parse(user).expect("a user id"),
            stripe_customer_id: StripeCustomerId::parse(customer).expect("a customer id"),
            stripe_account: StripeAccount::platform(),
            created_at: DateTime::UNIX_EPOCH,
        }
    }

    fn write(user: &str, customer: &str, token: i64) -> LinkWrite {
        LinkWrite {
            mapping: mapping(user, customer),
            token: LinkToken::from_stored(token),
            time: DateTime::UNIX_EPOCH,
            actor: Actor::new(String::new(), String::new()),
            prepared: None,
        }
    }

    fn holders(rows: &[(&str, &str, Option<i64>)]) -> LinkAttempt {
        LinkAttempt::Holders(
            rows.iter()
                .map(|(user, customer, token)| Holder {
                    mapping: mapping(user, customer),
                    token: token.map(LinkToken::from_stored),
                })
                .collect(),
        )
    }

    #[test]
    fn every_outcome_of_a_link() {
        let w = write("u1", "cus_1", 7);
        let m = |u, c| mapping(u, c);
        let cases = [
            (
                LinkAttempt::Inserted(m("u1", "cus_1")),
                LinkOutcome::Created(m("u1", "cus_1")),
            ),
            (LinkAttempt::Again, LinkOutcome::Undecided),
            (holders(&[]), LinkOutcome::Undecided),
            (
                holders(&[("u1", "cus_1", Some(7))]),
                LinkOutcome::Created(m("u1", "cus_1")),
            ),
            (
                holders(&[("u1", "cus_1", Some(8))]),
                LinkOutcome::Present(m("u1", "cus_1")),
            ),
            (
                holders(&[("u1", "cus_1", None)]),
                LinkOutcome::Present(m("u1", "cus_1")),
            ),
            (
                holders(&[("u1", "cus_2", None)]),
                LinkOutcome::UserConflict(m("u1", "cus_2")),
            ),
            (
                holders(&[("u2", "cus_1", None)]),
                LinkOutcome::CustomerConflict(m("u2", "cus_1")),
            ),
            // The user's mapping decides first, whatever the order found.
            (
                holders(&[("u2", "cus_1", None), ("u1", "cus_3", None)]),
                LinkOutcome::UserConflict(m("u1", "cus_3")),
            ),
        ];
        for (attempt, expected) in cases {
            assert_eq!(attempt.outcome(&w), expected);
        }
    }

    #[test]
    fn a_key_set_admits_links_sharing_no_key() {
        let fingerprints = KeyFingerprints::default();
        let of = |user, customer| fingerprints.of("", user, customer);
        let mut set = KeySet::default();
        set.add(of("u1", "cus_1"));
        assert!(!set.admits(of("u1", "cus_2")));
        assert!(!set.admits(of("u2", "cus_1")));
        assert!(set.admits(of("u2", "cus_2")));
        // Users and customers are hashed apart, and so are accounts.
        assert!(set.admits(of("cus_1", "u1")));
        assert!(set.admits(fingerprints.of("acct_1", "u1", "cus_1")));
        set.remove(of("u1", "cus_1"));
        assert!(set.admits(of("u1", "cus_2")));
    }
}

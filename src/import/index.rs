//! What an import remembers of the rows it has accepted: 64-bit
//! fingerprints, never the ids themselves.
//!
//! A real run remembers one fingerprint per accepted pair (about 18 bytes
//! a row in the set, 18 MiB at a million rows): the database decides every
//! row, and the fingerprints only tell a refusal caused by an earlier row of
//! the input (`CONFLICT_IN_INPUT`) from one caused by the database as it
//! was. A dry run writes nothing, so it must also find those conflicts
//! itself: it remembers every accepted user and customer too (about three
//! times as much).
//!
//! A collision (two different ids with one 64-bit fingerprint; odds about
//! 1 in 10^7 at a million rows, with a random key per run) can only make a
//! real run's refusal say `CONFLICT_IN_INPUT` instead of
//! `USER_ALREADY_LINKED`; in a dry run it could refuse a row that the real
//! run would create. A dry run is a preview.

use std::{
    collections::HashSet,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
};

use super::{Outcome, Valid};

/// The fingerprints of one row's ids.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    pub user: u64,
    pub customer: u64,
}

type Fingerprints = HashSet<u64, PassThrough>;

/// Fingerprints of the accepted rows (created or already present).
pub struct InputIndex {
    hasher: RandomState,
    pairs: Fingerprints,
    /// A dry run's accepted users and customers.
    sides: Option<(Fingerprints, Fingerprints)>,
}

impl InputIndex {
    pub fn new(dry_run: bool) -> Self {
        Self {
            hasher: RandomState::new(),
            pairs: Fingerprints::default(),
            sides: dry_run.then(Default::default),
        }
    }

    // Users and customers are hashed apart (a tag), so that a user id equal
    // to a customer id never looks like the same key in a batch.
    pub fn keys(&self, row: &Valid) -> Keys {
        Keys {
            user: self.hasher.hash_one((0u8, row.user_id.as_str())),
            customer: self.hasher.hash_one((1u8, row.stripe_customer_id.as_str())),
        }
    }

    fn pair(&self, user_id: &str, stripe_customer_id: &str) -> u64 {
        self.hasher.hash_one((2u8, user_id, stripe_customer_id))
    }

    pub fn accept(&mut self, row: &Valid) {
        let pair = self.pair(row.user_id.as_str(), row.stripe_customer_id.as_str());
        self.pairs.insert(pair);
        let keys = self.keys(row);
        if let Some((users, customers)) = &mut self.sides {
            users.insert(keys.user);
            customers.insert(keys.customer);
        }
    }

    /// Whether an earlier row of the input, accepted, was this pair.
    pub fn accepted(&self, user_id: &str, stripe_customer_id: &str) -> bool {
        self.pairs.contains(&self.pair(user_id, stripe_customer_id))
    }

    /// A dry run's decision for a row the database has no holder for: what
    /// the earlier accepted rows of the input say.
    pub fn without_holder(&self, row: &Valid) -> Outcome<'static> {
        if self.accepted(row.user_id.as_str(), row.stripe_customer_id.as_str()) {
            return Outcome::Present;
        }
        let keys = self.keys(row);
        match &self.sides {
            Some((users, customers))
                if users.contains(&keys.user) || customers.contains(&keys.customer) =>
            {
                Outcome::ConflictInInput
            }
            _ => Outcome::Created,
        }
    }
}

/// The keys are already uniform hashes: hash them no further.
pub type PassThrough = BuildHasherDefault<Identity>;

#[derive(Default)]
pub struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed with this; fold anything else in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

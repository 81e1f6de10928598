//! What an import remembers of the rows it has accepted: 64-bit
//! fingerprints of their users and customers, never the ids themselves, so
//! that a million rows cost about 50 MiB rather than the input's size in
//! strings plus their overhead.
//!
//! A fingerprint collision (two different ids with the same 64-bit hash,
//! odds about 1 in 10^7 at a million rows with a random key) can only make
//! a written row's refusal say `CONFLICT_IN_INPUT` instead of
//! `USER_ALREADY_LINKED`: the database decides whether it is refused. In a
//! dry run it could refuse a row that the real run would create; a dry run
//! is a preview.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
};

use super::{Outcome, Valid};

/// The fingerprints of one row's ids.
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    pub user: u64,
    pub customer: u64,
}

/// Fingerprints of the accepted rows (created or already present).
#[derive(Default)]
pub struct InputIndex {
    hasher: RandomState,
    /// Accepted user -> its customer.
    users: HashMap<u64, u64, PassThrough>,
    /// Accepted customers.
    customers: HashSet<u64, PassThrough>,
}

impl InputIndex {
    pub fn keys(&self, row: &Valid) -> Keys {
        Keys {
            user: self.user(row.user_id.as_str()),
            customer: self.customer(row.stripe_customer_id.as_str()),
        }
    }

    // Users and customers are hashed apart (a prefix byte), so that a user
    // id equal to a customer id never looks like the same key in a batch.
    fn user(&self, id: &str) -> u64 {
        self.hasher.hash_one((0u8, id))
    }

    fn customer(&self, id: &str) -> u64 {
        self.hasher.hash_one((1u8, id))
    }

    pub fn accept(&mut self, row: &Valid) {
        let keys = self.keys(row);
        self.users.insert(keys.user, keys.customer);
        self.customers.insert(keys.customer);
    }

    /// Whether an earlier row of the input, accepted, was this pair.
    pub fn accepted(&self, user_id: &str, stripe_customer_id: &str) -> bool {
        self.users.get(&self.user(user_id)) == Some(&self.customer(stripe_customer_id))
    }

    /// A dry run's decision for a row the database has no holder for: what
    /// the earlier accepted rows of the input say.
    pub fn without_holder(&self, row: &Valid) -> Outcome<'static> {
        let keys = self.keys(row);
        match self.users.get(&keys.user) {
            Some(customer) if *customer == keys.customer => Outcome::Present,
            Some(_) => Outcome::ConflictInInput,
            None if self.customers.contains(&keys.customer) => Outcome::ConflictInInput,
            None => Outcome::Created,
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

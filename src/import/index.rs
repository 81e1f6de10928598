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

use std::{collections::HashSet, hash::BuildHasherDefault};

use super::{Outcome, Valid};
use crate::mapping::{KeyFingerprints, KeySet, LinkKeys, Mapping, PassThrough};

/// Fingerprints of the accepted rows (created or already present).
pub struct InputIndex {
    fingerprints: KeyFingerprints,
    pairs: HashSet<u64, BuildHasherDefault<PassThrough>>,
    /// A dry run's accepted users and customers.
    sides: Option<KeySet>,
}

impl InputIndex {
    pub fn new(dry_run: bool) -> Self {
        Self {
            fingerprints: KeyFingerprints::default(),
            pairs: HashSet::default(),
            sides: dry_run.then(KeySet::default),
        }
    }

    /// The keys of `row`, for the batching rule.
    pub fn keys(&self, row: &Valid) -> LinkKeys {
        self.fingerprints.of(
            row.stripe_account.as_str(),
            row.user_id.as_str(),
            row.stripe_customer_id.as_str(),
        )
    }

    fn sides_of(&self, mapping: &Mapping) -> LinkKeys {
        self.fingerprints.of(
            mapping.stripe_account.as_str(),
            mapping.user_id.as_str(),
            mapping.stripe_customer_id.as_str(),
        )
    }

    fn pair(&self, mapping: &Mapping) -> u64 {
        self.fingerprints.pair(
            mapping.stripe_account.as_str(),
            mapping.user_id.as_str(),
            mapping.stripe_customer_id.as_str(),
        )
    }

    pub fn accept(&mut self, mapping: &Mapping) {
        self.pairs.insert(self.pair(mapping));
        let keys = self.sides_of(mapping);
        if let Some(sides) = &mut self.sides {
            sides.add(keys);
        }
    }

    /// Whether an earlier row of the input, accepted, was this pair.
    pub fn accepted(&self, mapping: &Mapping) -> bool {
        self.pairs.contains(&self.pair(mapping))
    }

    /// A dry run's decision for a row the database has no holder for: what
    /// the earlier accepted rows of the input say.
    pub fn without_holder(&self, mapping: &Mapping) -> Outcome {
        if self.accepted(mapping) {
            return Outcome::Present;
        }
        let keys = self.sides_of(mapping);
        match &self.sides {
            Some(sides) if !sides.admits(keys) => Outcome::ConflictInInput,
            _ => Outcome::Created,
        }
    }
}

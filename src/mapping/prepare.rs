//! PrepareLink's rules: the idempotency key and metadata a get-or-create
//! creates its Stripe customer with, and the generation that tells a stale
//! preparation from a current one.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::{Mapping, StripeAccount, UserId};

/// How many times a user has been unlinked in an account. A preparation is
/// valid while the user stays at its generation: the next Unlink moves the
/// user on, and with it the idempotency key, so a later get-or-create makes
/// a new customer instead of getting back, from Stripe's replay of the old
/// key, the customer just unlinked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation(i64);

impl Generation {
    /// A generation as counted or as a caller passed it back; `None` when
    /// negative (no count is).
    pub fn new(count: i64) -> Option<Self> {
        (count >= 0).then_some(Self(count))
    }

    pub fn count(self) -> i64 {
        self.0
    }
}

/// What makes this deployment's idempotency keys its own: two deployments
/// (a live and a test database, two services) never share a key for the
/// same user. Random per database unless configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyNamespace(String);

impl IdempotencyNamespace {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self(namespace.into())
    }
}

/// What the store found for a PrepareLink: the user's mapping in the
/// account, or its generation there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    Linked(Mapping),
    Unlinked(Generation),
}

/// PrepareLink's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// The user's mapping in the account.
    Linked(Mapping),
    /// The user has none there: how to create its customer.
    Create(Preparation),
}

/// How to create the customer of a user who has none in an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preparation {
    pub idempotency_key: String,
    pub metadata: BTreeMap<String, String>,
    pub generation: Generation,
}

/// Prefix of every key: says whose key it is in Stripe's request log, and
/// which derivation made it.
const KEY_PREFIX: &str = "customer-mapping-v1-";

impl Preparation {
    /// The same for every caller, replica and restart given the same
    /// arguments. The key is a hash: user ids may be e-mail addresses, and
    /// keys are shown in Stripe's request logs.
    pub fn new(
        namespace: &IdempotencyNamespace,
        account: &StripeAccount,
        user: &UserId,
        generation: Generation,
    ) -> Self {
        let mut hash = Sha256::new();
        // Each part length-prefixed, so no two argument lists hash alike.
        for part in [
            namespace.0.as_bytes(),
            account.as_str().as_bytes(),
            user.as_str().as_bytes(),
            &generation.0.to_be_bytes(),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let idempotency_key = format!("{KEY_PREFIX}{}", hex::encode(hash.finalize()));
        let mut metadata = BTreeMap::from([
            ("customer_mapping_user_id".to_owned(), user.to_string()),
            (
                "customer_mapping_generation".to_owned(),
                generation.0.to_string(),
            ),
        ]);
        // Stripe drops metadata keys with empty values; the platform's own
        // account is the one a customer without this key is on.
        if !account.is_platform() {
            metadata.insert(
                "customer_mapping_stripe_account".to_owned(),
                account.to_string(),
            );
        }
        Self {
            idempotency_key,
            metadata,
            generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, account: &str, user: &str, generation: i64) -> String {
        Preparation::new(
            &IdempotencyNamespace::new(namespace),
            &StripeAccount::parse(account).expect("an account"),
            &UserId::parse(user).expect("a user"),
            Generation::new(generation).expect("a generation"),
        )
        .idempotency_key
    }

    #[test]
    fn a_key_is_stable_and_differs_in_every_argument() {
        let base = key("ns", "", "alice@example.com", 0);
        assert_eq!(base, key("ns", "", "alice@example.com", 0));
        for other in [
            key("ns2", "", "alice@example.com", 0),
            key("ns", "acct_1", "alice@example.com", 0),
            key("ns", "", "bob@example.com", 0),
            key("ns", "", "alice@example.com", 1),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn a_key_is_short_plain_and_hides_the_user() {
        let long_user = "😀".repeat(255);
        let key = key(&"n".repeat(255), "acct_x", &long_user, i64::MAX);
        assert!(key.len() <= 255);
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
        assert!(!self::key("ns", "", "alice", 0).contains("alice"));
    }

    #[test]
    fn metadata_names_the_user_the_generation_and_a_connected_account() {
        let user = UserId::parse("u1").expect("a user");
        let ns = IdempotencyNamespace::new("ns");
        let generation = Generation::new(3).expect("a generation");
        let own = Preparation::new(&ns, &StripeAccount::platform(), &user, generation);
        assert_eq!(
            own.metadata,
            BTreeMap::from([
                ("customer_mapping_user_id".into(), "u1".into()),
                ("customer_mapping_generation".into(), "3".into()),
            ])
        );
        let account = StripeAccount::parse("acct_9").expect("an account");
        let connected = Preparation::new(&ns, &account, &user, generation);
        assert_eq!(
            connected.metadata.get("customer_mapping_stripe_account"),
            Some(&"acct_9".to_owned())
        );
    }
}

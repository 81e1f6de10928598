//! Links: one lane. A shared statement is `LINK_SQL` (`store/link.rs`) for
//! every Link queued while the lane was busy, with per-pair outcomes.
//!
//! On top of the argument of the module above, two rules keep each Link's
//! answer what it would be alone:
//!
//! - **No two pairs of one statement share a user or a customer**
//!   ([`Work::next_batch`]): a queued Link whose key is already taken by an
//!   earlier pair of the batch waits for the next statement, and so does
//!   every later one of the same keys, so contenders still go in arrival
//!   order. Each pair is then decided against rows outside the statement,
//!   exactly as in a statement of its own (`store/link.rs`, 1 to 3).
//! - **No key in two shared statements in flight** ([`Claim`]). A
//!   statement inserting several rows holds the keys of those it already
//!   inserted while it waits on a key another transaction holds; two such
//!   statements waiting on each other's keys would deadlock (PostgreSQL
//!   aborts one after `deadlock_timeout`, a second). A queued Link whose
//!   user or customer is in a shared statement in flight waits for it to
//!   end. A statement of one pair never waits while holding a key (its
//!   speculative insertion backs out first), so it cannot close a cycle.
//!   This server therefore cannot deadlock with itself; another replica's
//!   shared statement, or an import, still can: the aborted statement
//!   wrote nothing, and each of its Links runs again alone
//!   ([`Sharing::Alone`]).
//!
//! [`Sharing::Alone`]: crate::store::Sharing::Alone

use std::{
    collections::{HashSet, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::DbErr;
use tokio::time::Instant;

use super::{Call, Lane, Work};
use crate::store::{
    events::Actor,
    link::{self, LinkAttempt, Pair},
    postgres::Pool,
};

/// Pairs per shared statement at most: enough to answer every Link the
/// server lets in at once in a few statements, small enough that one
/// statement stays a few milliseconds of work.
const MAX_PAIRS_PER_STATEMENT: usize = 256;

/// One Link call's attempt, owned so that it can wait in the queue.
#[derive(Debug)]
pub(in crate::store) struct LinkRequest {
    pub user_id: String,
    pub stripe_customer_id: String,
    pub created_at: DateTime<Utc>,
    pub token: i64,
    pub caller: String,
    pub request_id: String,
}

impl LinkRequest {
    /// A request for `user` and `customer`, the rest zero (unit tests).
    #[cfg(test)]
    pub fn of(user: &str, customer: &str) -> Self {
        Self {
            user_id: user.to_owned(),
            stripe_customer_id: customer.to_owned(),
            created_at: DateTime::UNIX_EPOCH,
            token: 0,
            caller: String::new(),
            request_id: String::new(),
        }
    }

    fn pair(&self) -> Pair<'_> {
        Pair {
            user_id: &self.user_id,
            stripe_customer_id: &self.stripe_customer_id,
            created_at: self.created_at,
            token: self.token,
            // A Link's event happens when its mapping is created.
            time: self.created_at,
            actor: Actor {
                caller: &self.caller,
                request_id: &self.request_id,
            },
        }
    }
}

/// The Link lane.
#[derive(Debug)]
pub(in crate::store) struct Links(Arc<Lane<Link>>);

impl Links {
    pub fn new(stall_timeout: Duration) -> Self {
        Self(Arc::new(Lane::new(Link::default(), stall_timeout)))
    }

    /// One attempt of `request`, sharing a statement with concurrent Links
    /// when the lane is busy.
    pub async fn link(
        &self,
        pool: &Pool,
        request: LinkRequest,
        until: Instant,
    ) -> Result<LinkAttempt, DbErr> {
        self.0.call(pool, request, until).await
    }

    /// One attempt of `request` in a statement of its own.
    pub async fn link_alone(
        &self,
        pool: &Pool,
        request: LinkRequest,
        until: Instant,
    ) -> Result<LinkAttempt, DbErr> {
        self.0.call_alone(pool, request, until).await
    }

    /// See [`Lane::forget`].
    pub fn forget(&self, pool: &Pool) {
        self.0.forget(pool);
    }
}

#[derive(Default)]
struct Link {
    busy: Arc<Mutex<Busy>>,
}

/// The keys of the shared statements in flight, as hashes (two keys with
/// one hash only make a Link wait for the next statement).
#[derive(Debug, Default)]
struct Busy {
    keys: HashSet<u64>,
    /// Bumped by `forget`: older claims no longer hold anything.
    generation: u64,
}

/// The keys one shared statement holds, released when it ends.
pub(super) struct Claim {
    busy: Arc<Mutex<Busy>>,
    keys: Vec<u64>,
    generation: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut busy = lock(&self.busy);
        if busy.generation == self.generation {
            for key in &self.keys {
                busy.keys.remove(key);
            }
        }
    }
}

fn lock(busy: &Mutex<Busy>) -> std::sync::MutexGuard<'_, Busy> {
    // Every critical section leaves the set consistent.
    busy.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn key_hash(side: u8, key: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (side, key).hash(&mut hasher);
    hasher.finish()
}

impl Work for Link {
    type Request = LinkRequest;
    type Answer = LinkAttempt;
    type Claim = Claim;

    /// One. Measured against two on this machine (docs/PERFORMANCE.md): the
    /// Links that queue behind one statement make bigger batches, which
    /// cost PostgreSQL and the server less per Link (link-new at 32 in
    /// flight: 10,173 against 6,976 Links/s). A statement that stalls stops
    /// counting (see the module above), so Links of other keys do not wait
    /// behind one that waits on a lock.
    const IN_FLIGHT: usize = 1;

    fn name(&self) -> &'static str {
        "link"
    }

    fn next_batch(&self, queue: &mut VecDeque<Call<Self>>) -> Option<(Vec<Call<Self>>, Claim)> {
        let mut busy = lock(&self.busy);
        let keys: Vec<[u64; 2]> = queue
            .iter()
            .map(|call| {
                [
                    key_hash(0, &call.request.user_id),
                    key_hash(1, &call.request.stripe_customer_id),
                ]
            })
            .collect();
        let take: Vec<bool> = {
            // Keys of this batch, and of the Links left queued: both are
            // claimed either way, so a Link left queued keeps later Links
            // of its keys behind it and contenders go in arrival order.
            let mut seen: HashSet<u64> = HashSet::new();
            let mut taken = 0;
            keys.iter()
                .map(|pair| {
                    let free = pair
                        .iter()
                        .all(|key| !busy.keys.contains(key) && !seen.contains(key));
                    seen.extend(pair);
                    let take = free && taken < MAX_PAIRS_PER_STATEMENT;
                    taken += usize::from(take);
                    take
                })
                .collect()
        };
        let mut batch = Vec::new();
        let mut claimed = Vec::new();
        let mut left = VecDeque::new();
        for ((call, take), pair) in queue.drain(..).zip(take).zip(keys) {
            if take {
                batch.push(call);
                claimed.extend(pair);
            } else {
                left.push_back(call);
            }
        }
        *queue = left;
        if batch.is_empty() {
            return None;
        }
        busy.keys.extend(&claimed);
        let claim = Claim {
            busy: self.busy.clone(),
            keys: claimed,
            generation: busy.generation,
        };
        Some((batch, claim))
    }

    fn forget(&self) {
        let mut busy = lock(&self.busy);
        busy.generation += 1;
        busy.keys.clear();
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) {
        let Some(until) = batch.iter().map(|call| call.until).max() else {
            return;
        };
        let conn = match pool.acquire(until).await {
            Ok(conn) => conn,
            Err(err) => {
                for call in batch {
                    call.answer(Err(err.clone()));
                }
                return;
            }
        };
        let pairs: Vec<Pair<'_>> = batch.iter().map(|call| call.request.pair()).collect();
        let linked = match pairs.as_slice() {
            [pair] => link::link_one(conn, *pair, until).await,
            pairs => link::link_pairs(conn, pairs, "Links", until).await,
        };
        drop(pairs);
        match linked {
            Ok(linked) => {
                let attempts = link::attempts(batch.iter().map(|call| &call.request), linked);
                for (call, attempt) in batch.into_iter().zip(attempts) {
                    call.answer(Ok(attempt));
                }
            }
            Err(err) => {
                for call in batch {
                    let until = call.until;
                    call.answer(link::after_failure(err.clone(), until));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(user: &str, customer: &str) -> Call<Link> {
        Call::new(LinkRequest::of(user, customer), Instant::now()).0
    }

    fn pairs(calls: impl IntoIterator<Item = impl std::borrow::Borrow<Call<Link>>>) -> Vec<String> {
        calls
            .into_iter()
            .map(|c| {
                let r = &c.borrow().request;
                format!("{}:{}", r.user_id, r.stripe_customer_id)
            })
            .collect()
    }

    fn next(link: &Link, queue: &mut VecDeque<Call<Link>>) -> (Vec<String>, Option<Claim>) {
        match link.next_batch(queue) {
            Some((batch, claim)) => (pairs(&batch), Some(claim)),
            None => (Vec::new(), None),
        }
    }

    #[test]
    fn a_batch_holds_no_two_pairs_sharing_a_key_and_keeps_contenders_in_order() {
        let link = Link::default();
        let mut queue: VecDeque<Call<Link>> = [
            call("u1", "c1"),
            call("u2", "c2"),
            call("u1", "c3"), // u1 is taken: waits
            call("u3", "c3"), // c3 is claimed by the Link left queued: waits behind it
            call("u4", "c1"), // c1 is taken: waits
            call("u5", "c5"),
        ]
        .into();
        let (batch, first) = next(&link, &mut queue);
        assert_eq!(batch, ["u1:c1", "u2:c2", "u5:c5"]);
        assert_eq!(pairs(&queue), ["u1:c3", "u3:c3", "u4:c1"]);
        // While the first is in flight, its keys hold back every Link left.
        assert_eq!(next(&link, &mut queue).0, Vec::<String>::new());
        drop(first);
        let (batch, second) = next(&link, &mut queue);
        assert_eq!(batch, ["u1:c3", "u4:c1"]);
        drop(second);
        assert_eq!(next(&link, &mut queue).0, ["u3:c3"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn two_shared_statements_in_flight_share_no_key() {
        let link = Link::default();
        let mut queue: VecDeque<Call<Link>> = [call("u1", "c1"), call("u2", "c2")].into();
        let (first, _in_flight) = next(&link, &mut queue);
        assert_eq!(first, ["u1:c1", "u2:c2"]);
        queue.extend([call("u3", "c1"), call("u2", "c4"), call("u5", "c5")]);
        assert_eq!(next(&link, &mut queue).0, ["u5:c5"]);
        assert_eq!(pairs(&queue), ["u3:c1", "u2:c4"]);
    }

    #[test]
    fn forgotten_statements_hold_no_keys() {
        let link = Link::default();
        let mut queue: VecDeque<Call<Link>> = [call("u1", "c1")].into();
        let (_, stuck) = next(&link, &mut queue);
        link.forget();
        queue.push_back(call("u1", "c1"));
        let (batch, fresh) = next(&link, &mut queue);
        assert_eq!(batch, ["u1:c1"]);
        // The stuck statement ending later releases nothing of the new one.
        drop(stuck);
        queue.push_back(call("u1", "c2"));
        assert_eq!(next(&link, &mut queue).0, Vec::<String>::new());
        drop(fresh);
    }

    #[test]
    fn a_batch_is_bounded() {
        let link = Link::default();
        let mut queue: VecDeque<Call<Link>> = (0..MAX_PAIRS_PER_STATEMENT + 3)
            .map(|i| call(&format!("u{i}"), &format!("c{i}")))
            .collect();
        assert_eq!(next(&link, &mut queue).0.len(), MAX_PAIRS_PER_STATEMENT);
        assert_eq!(queue.len(), 3);
    }
}

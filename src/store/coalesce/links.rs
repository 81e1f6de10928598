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
//! - **At most one shared statement in flight** (`SHARED_IN_FLIGHT`). A
//!   statement inserting several rows holds the keys of those it already
//!   inserted while it waits on a key another transaction holds; two such
//!   statements can wait on each other (PostgreSQL aborts one with a
//!   deadlock after `deadlock_timeout`, a second). A statement of one pair
//!   never waits while holding a key, so with one shared statement per
//!   server this server cannot deadlock with itself. Another replica's
//!   shared statement, or an import, still can: the aborted statement wrote
//!   nothing, and each of its Links runs again alone ([`Sharing::Alone`]).
//!
//! [`Sharing::Alone`]: crate::store::Sharing::Alone

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

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
    pub fn new() -> Self {
        Self(Arc::new(Lane::new(Link)))
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

struct Link;

impl Work for Link {
    type Request = LinkRequest;
    type Answer = LinkAttempt;

    /// As for reads: one statement on its way while the next forms.
    const IN_FLIGHT: usize = 2;
    /// See the module comment.
    const SHARED_IN_FLIGHT: usize = 1;

    fn name(&self) -> &'static str {
        "link"
    }

    fn next_batch(queue: &mut VecDeque<Call<Self>>) -> Vec<Call<Self>> {
        let take: Vec<bool> = {
            let mut users = HashSet::new();
            let mut customers = HashSet::new();
            let mut taken = 0;
            queue
                .iter()
                .map(|call| {
                    let request = &call.request;
                    // Both keys are claimed either way: a Link left queued
                    // keeps later Links of its keys behind it.
                    let user_free = users.insert(request.user_id.as_str());
                    let customer_free = customers.insert(request.stripe_customer_id.as_str());
                    let take = user_free && customer_free && taken < MAX_PAIRS_PER_STATEMENT;
                    taken += usize::from(take);
                    take
                })
                .collect()
        };
        let mut batch = Vec::new();
        let mut left = VecDeque::new();
        for (call, take) in queue.drain(..).zip(take) {
            if take {
                batch.push(call);
            } else {
                left.push_back(call);
            }
        }
        *queue = left;
        batch
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
        let (reply, _answer) = tokio::sync::oneshot::channel();
        Call {
            request: LinkRequest {
                user_id: user.to_owned(),
                stripe_customer_id: customer.to_owned(),
                created_at: DateTime::UNIX_EPOCH,
                token: 0,
                caller: String::new(),
                request_id: String::new(),
            },
            until: Instant::now(),
            reply,
        }
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

    #[test]
    fn a_batch_holds_no_two_pairs_sharing_a_key_and_keeps_contenders_in_order() {
        let mut queue: VecDeque<Call<Link>> = [
            call("u1", "c1"),
            call("u2", "c2"),
            call("u1", "c3"), // u1 is taken: waits
            call("u3", "c3"), // c3 is claimed by the Link left queued: waits behind it
            call("u4", "c1"), // c1 is taken: waits
            call("u5", "c5"),
        ]
        .into();
        let batch = Link::next_batch(&mut queue);
        assert_eq!(pairs(&batch), ["u1:c1", "u2:c2", "u5:c5"]);
        assert_eq!(pairs(&queue), ["u1:c3", "u3:c3", "u4:c1"]);
        let batch = Link::next_batch(&mut queue);
        assert_eq!(pairs(&batch), ["u1:c3", "u4:c1"]);
        assert_eq!(pairs(Link::next_batch(&mut queue)), ["u3:c3"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_batch_is_bounded() {
        let mut queue: VecDeque<Call<Link>> = (0..MAX_PAIRS_PER_STATEMENT + 3)
            .map(|i| call(&format!("u{i}"), &format!("c{i}")))
            .collect();
        assert_eq!(Link::next_batch(&mut queue).len(), MAX_PAIRS_PER_STATEMENT);
        assert_eq!(queue.len(), 3);
    }
}

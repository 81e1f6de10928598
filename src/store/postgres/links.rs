//! Links: one lane. A shared statement is `LINK_SQL` (`link.rs`) for every
//! Link queued while the lane was busy, each with its own outcome; the
//! lane keeps the Links of one statement apart (`lane.rs`).

use std::{sync::Arc, time::Duration};

use sea_orm::DbErr;
use tokio::time::Instant;

use super::{
    lane::{Call, Lane, Work},
    link,
    pool::Pool,
};
use crate::{
    mapping::{LinkAttempt, LinkWrite},
    store::errors::attempt_after,
};

/// Links per shared statement at most: enough to answer every Link the
/// server lets in at once in a few statements, small enough that one
/// statement stays a few milliseconds of work.
const MAX_LINKS_PER_STATEMENT: usize = 256;

/// The Link lane.
#[derive(Debug)]
pub(super) struct Links(Arc<Lane<Link>>);

impl Links {
    pub fn new(pool: &Pool, stall_timeout: Duration) -> Self {
        Self(Lane::new(Link, pool.clone(), stall_timeout))
    }

    /// One attempt of `write`, sharing a statement with concurrent Links
    /// when the lane is busy.
    pub async fn link(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        self.0.call(write, until).await
    }

    /// One attempt of `write` in a statement of its own.
    pub async fn link_alone(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        self.0.call_alone(write, until).await
    }

    /// See [`Lane::kick`].
    pub fn kick(&self) {
        self.0.kick();
    }
}

struct Link;

impl Work for Link {
    type Request = LinkWrite;
    type Answer = LinkAttempt;

    const MAX_CALLS_PER_STATEMENT: usize = MAX_LINKS_PER_STATEMENT;

    fn name(&self) -> &'static str {
        "link"
    }

    fn keys(write: &LinkWrite) -> Option<(&str, &str, &str)> {
        let mapping = &write.mapping;
        Some((
            mapping.stripe_account.as_str(),
            mapping.user_id.as_str(),
            mapping.stripe_customer_id.as_str(),
        ))
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) {
        let Some(until) = batch.iter().map(|call| call.until).max() else {
            return;
        };
        let conn = match pool.acquire(until).await {
            Ok(conn) => conn,
            // Not repeated: the pool has its own bounds, and a database
            // that cannot be reached is UNAVAILABLE.
            Err(err) => {
                for call in batch {
                    call.answer(Err(err.clone()));
                }
                return;
            }
        };
        let writes: Vec<&LinkWrite> = batch.iter().map(|call| &call.request).collect();
        let attempts = link::link(conn, &writes, "Links", until).await;
        drop(writes);
        match attempts {
            Ok(attempts) => {
                for (call, attempt) in batch.into_iter().zip(attempts) {
                    call.answer(Ok(attempt));
                }
            }
            Err(err) => {
                for call in batch {
                    let until = call.until;
                    call.answer(attempt_after(err.clone(), until));
                }
            }
        }
    }
}

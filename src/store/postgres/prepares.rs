//! PrepareLinks: one lane, like Gets (`gets.rs`). A shared read is one
//! statement for every PrepareLink queued while the lane was busy: each
//! user's mapping in its account and, for a user with none, its generation
//! there, both from the statement's one snapshot.

use std::{sync::Arc, time::Duration};

use sea_orm::{
    DbErr,
    sqlx::{self, Row},
};
use tokio::time::Instant;

use super::{
    lane::{Call, Lane, Work},
    model,
    pool::{Pool, sqlx_err},
};
use crate::store::rows::{Found, KIND_UNLINKED};

/// For each (user, account) of `$1`, `$2`: its index `n` (from 1), the
/// mapping's columns (NULL when there is none), and the number of times
/// the user was unlinked there (only when there is no mapping).
const PREPARE_SQL: &str = "\
SELECT i.n, s.id, s.user_id, s.stripe_customer_id, s.created_at, s.link_token, s.stripe_account,
       CASE WHEN s.id IS NULL THEN
         (SELECT count(*) FROM mapping_events e
          WHERE e.user_id = i.user_id AND e.stripe_account = i.stripe_account AND e.kind = $3)
       END AS generation
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS i (user_id, stripe_account, n)
LEFT JOIN stripe_customers s ON s.user_id = i.user_id AND s.stripe_account = i.stripe_account";

/// The PrepareLink lane.
#[derive(Debug)]
pub(super) struct Prepares(Arc<Lane<Prepare>>);

impl Prepares {
    pub fn new(pool: &Pool, stall_timeout: Duration) -> Self {
        Self(Lane::new(Prepare, pool.clone(), stall_timeout))
    }

    /// What the store holds for `user` in `account`.
    pub async fn prepare(&self, user: &str, account: &str, until: Instant) -> Result<Found, DbErr> {
        self.0
            .call((user.to_owned(), account.to_owned()), until)
            .await
    }

    /// See [`Lane::kick`].
    pub fn kick(&self) {
        self.0.kick();
    }
}

struct Prepare;

impl Work for Prepare {
    /// (user, account).
    type Request = (String, String);
    type Answer = Found;

    /// Every queued call: a read takes no lock.
    const MAX_CALLS_PER_STATEMENT: usize = usize::MAX;

    fn name(&self) -> &'static str {
        "prepare_link"
    }

    fn keys(_: &(String, String)) -> Option<(&str, &str, &str)> {
        None
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) {
        let Some(until) = batch.iter().map(|call| call.until).max() else {
            return;
        };
        let users: Vec<&str> = batch.iter().map(|call| call.request.0.as_str()).collect();
        let accounts: Vec<&str> = batch.iter().map(|call| call.request.1.as_str()).collect();
        let found = async {
            let mut conn = pool.acquire(until).await?;
            let rows = conn
                .bounded(until, "a database query", async |conn| {
                    sqlx::query(PREPARE_SQL)
                        .bind(&users)
                        .bind(&accounts)
                        .bind(KIND_UNLINKED)
                        .fetch_all(conn)
                        .await
                })
                .await?;
            conn.release();
            let mut found: Vec<Option<Found>> = batch.iter().map(|_| None).collect();
            for row in rows {
                let n: i64 = row.try_get("n").map_err(sqlx_err)?;
                let generation: Option<i64> = row.try_get("generation").map_err(sqlx_err)?;
                let slot = usize::try_from(n - 1)
                    .ok()
                    .and_then(|i| found.get_mut(i))
                    .ok_or_else(|| DbErr::Custom(format!("PrepareLink row {n} out of range")))?;
                *slot = Some(match generation {
                    Some(count) => Found::Unlinked(count),
                    None => Found::Linked(model(row)?),
                });
            }
            Ok::<_, DbErr>(found)
        }
        .await;
        match found {
            Ok(found) => {
                for (call, found) in batch.into_iter().zip(found) {
                    let found =
                        found.ok_or_else(|| DbErr::Custom("a PrepareLink without a row".into()));
                    call.answer(found);
                }
            }
            Err(err) => {
                for call in batch {
                    call.answer(Err(err.clone()));
                }
            }
        }
    }
}

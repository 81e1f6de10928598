//! Concurrent Gets on PostgreSQL, coalesced into one statement.
//!
//! Each key (user, customer) has a lane. A Get that finds fewer than
//! [`READS_IN_FLIGHT`] reads in flight on its lane sends its own statement at
//! once (`WHERE key = $1`): a lone call waits for nothing, and there is no
//! timer anywhere. A Get that arrives while the lane is busy queues, and when
//! a read ends, everything queued goes out as the next read, one statement
//! (`WHERE key = ANY($1)`): a busy server answers many Gets per round trip.
//!
//! # Why each answer is still the state at one instant inside its call
//!
//! A queued Get is answered only by a read *taken from the queue after it
//! joined*: the statement is sent after the Get arrived, and its reply
//! reaches the Get before the Get returns. PostgreSQL answers a statement
//! from one snapshot, taken when the statement starts; so the answer is the
//! committed state at an instant inside the Get's call, exactly as for a Get
//! with its own statement. A Get never joins a read already in flight: that
//! read's snapshot may predate the Get, and would miss a Link acknowledged
//! before the Get began. Several Gets answered by one statement share its
//! instant, which is a legal order for concurrent calls.
//!
//! # Bounds
//!
//! A queued Get waits no longer than its own deadline. A read is bounded by
//! the latest deadline among the Gets it answers (and, as every statement,
//! closes its connection if cut off). When the database stops answering the
//! health supervisor calls [`Reads::forget`]: reads stuck on the old
//! connections stop counting, so new Gets are not held behind them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use sea_orm::{
    ColumnTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryTrait, RuntimeErr,
    sea_query::{Expr, ExprTrait, extension::postgres::PgFunc},
};
use tokio::{sync::oneshot, time::Instant};

use super::{
    entity::{Column, Entity as StripeCustomers, Model},
    errors::timed_out,
    model,
    postgres::Pool,
};

/// Reads a lane keeps in flight before Gets start to queue. Two: while one
/// statement is on its way, the next batch forms and can go out as soon as
/// the first returns its connection, so the database always has the next
/// read to do; more would only split the same Gets into smaller batches.
const READS_IN_FLIGHT: usize = 2;

/// The lanes, one per key.
#[derive(Debug)]
pub(super) struct Reads {
    by_user: Arc<Lane>,
    by_customer: Arc<Lane>,
}

impl Reads {
    pub fn new() -> Self {
        Self {
            by_user: Arc::new(Lane::new(Column::UserId)),
            by_customer: Arc::new(Lane::new(Column::StripeCustomerId)),
        }
    }

    /// The row holding `value` in `column` (user_id or stripe_customer_id).
    pub async fn get(
        &self,
        pool: &Pool,
        column: Column,
        value: &str,
        until: Instant,
    ) -> Result<Option<Model>, DbErr> {
        let lane = match column {
            Column::StripeCustomerId => &self.by_customer,
            _ => &self.by_user,
        };
        lane.get(pool, value, until).await
    }

    /// Stops counting the reads in flight now (they are stuck on a database
    /// that stopped answering) and sends the queued Gets out at once.
    pub fn forget(&self, pool: &Pool) {
        self.by_user.forget(pool);
        self.by_customer.forget(pool);
    }
}

#[derive(Debug)]
struct Lane {
    column: Column,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Reads in flight that count against [`READS_IN_FLIGHT`].
    in_flight: usize,
    /// Bumped by `forget`: reads of older generations no longer count.
    generation: u64,
    /// Gets waiting for the next read.
    queued: Vec<Queued>,
}

#[derive(Debug)]
struct Queued {
    value: String,
    until: Instant,
    reply: oneshot::Sender<Result<Option<Model>, DbErr>>,
}

/// A read in flight; when it ends (even if its future is dropped) the lane
/// sends the queued Gets out.
struct InFlight {
    lane: Arc<Lane>,
    pool: Pool,
    generation: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.lane.finished(&self.pool, self.generation);
    }
}

impl Lane {
    fn new(column: Column) -> Self {
        Self {
            column,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the state consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn get(
        self: &Arc<Self>,
        pool: &Pool,
        value: &str,
        until: Instant,
    ) -> Result<Option<Model>, DbErr> {
        let waiting = {
            let mut state = self.lock();
            if state.in_flight < READS_IN_FLIGHT {
                state.in_flight += 1;
                Err(state.generation)
            } else {
                let (reply, answer) = oneshot::channel();
                state.queued.push(Queued {
                    value: value.to_owned(),
                    until,
                    reply,
                });
                Ok(answer)
            }
        };
        match waiting {
            Err(generation) => {
                let _in_flight = InFlight {
                    lane: self.clone(),
                    pool: pool.clone(),
                    generation,
                };
                let stmt = StripeCustomers::find()
                    .filter(self.column.eq(value))
                    .build(DbBackend::Postgres);
                let mut conn = pool.acquire(until).await?;
                let row = conn.fetch_optional(&stmt, until).await?;
                conn.release();
                row.map(model).transpose()
            }
            Ok(answer) => match tokio::time::timeout_at(until, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_dropped)) => Err(DbErr::Conn(RuntimeErr::Internal(
                    "a coalesced read ended without an answer".into(),
                ))),
                Err(_) => Err(timed_out("waiting for a coalesced read")),
            },
        }
    }

    /// A read of `generation` ended: the queued Gets, if any, go out as the
    /// next read, which takes over its place in flight.
    fn finished(self: &Arc<Self>, pool: &Pool, generation: u64) {
        let mut state = self.lock();
        if generation != state.generation {
            return;
        }
        if state.queued.is_empty() {
            state.in_flight -= 1;
            return;
        }
        let batch = std::mem::take(&mut state.queued);
        let generation = state.generation;
        drop(state);
        self.spawn_batch(pool, batch, generation);
    }

    fn forget(self: &Arc<Self>, pool: &Pool) {
        let mut state = self.lock();
        state.generation += 1;
        state.in_flight = 0;
        if state.queued.is_empty() {
            return;
        }
        state.in_flight = 1;
        let batch = std::mem::take(&mut state.queued);
        let generation = state.generation;
        drop(state);
        self.spawn_batch(pool, batch, generation);
    }

    fn spawn_batch(self: &Arc<Self>, pool: &Pool, batch: Vec<Queued>, generation: u64) {
        let in_flight = InFlight {
            lane: self.clone(),
            pool: pool.clone(),
            generation,
        };
        tokio::spawn(async move {
            let lane = in_flight.lane.clone();
            lane.read_batch(&in_flight.pool, batch).await;
            drop(in_flight);
        });
    }

    /// One statement for every Get in `batch`, each answered with its row.
    async fn read_batch(&self, pool: &Pool, batch: Vec<Queued>) {
        let now = Instant::now();
        // Gets that gave up (their deadline passed) need no answer.
        let batch: Vec<Queued> = batch
            .into_iter()
            .filter(|q| !q.reply.is_closed() && q.until > now)
            .collect();
        let Some(until) = batch.iter().map(|q| q.until).max() else {
            return;
        };
        let mut values: Vec<String> = batch.iter().map(|q| q.value.clone()).collect();
        values.sort_unstable();
        values.dedup();
        let filter = if let [value] = values.as_slice() {
            // The same prepared statement as a lone Get.
            self.column.eq(value.as_str())
        } else {
            Expr::col((StripeCustomers, self.column)).eq(PgFunc::any(Expr::val(values)))
        };
        let stmt = StripeCustomers::find()
            .filter(filter)
            .build(DbBackend::Postgres);
        let rows = async {
            let mut conn = pool.acquire(until).await?;
            let rows = conn.fetch_all(&stmt, until).await?;
            conn.release();
            rows.into_iter().map(model).collect::<Result<Vec<_>, _>>()
        }
        .await;
        match rows {
            Ok(rows) => {
                let mut by_value: HashMap<&str, &Model> = HashMap::with_capacity(rows.len());
                for row in &rows {
                    by_value.insert(self.value_of(row), row);
                }
                for queued in batch {
                    let row = by_value.get(queued.value.as_str()).map(|&row| row.clone());
                    let _ = queued.reply.send(Ok(row));
                }
            }
            Err(err) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn value_of<'a>(&self, row: &'a Model) -> &'a str {
        match self.column {
            Column::StripeCustomerId => &row.stripe_customer_id,
            _ => &row.user_id,
        }
    }
}

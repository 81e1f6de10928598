//! Concurrent calls on PostgreSQL, coalesced into shared statements: Gets
//! (`reads.rs`) and Links (`links.rs`).
//!
//! A [`Lane`] keeps up to [`Work::IN_FLIGHT`] statements in flight. A call
//! that finds a free place sends its own statement at once: a lone call
//! waits for nothing, and there is no timer anywhere. A call that arrives
//! while every place is taken queues; when a statement ends, the queued
//! calls go out together as the next one, so a busy server answers many
//! calls per round trip.
//!
//! # Why each answer is still the state at one instant inside its call
//!
//! A queued call is answered only by a statement *taken from the queue
//! after it joined*: the statement is sent after the call arrived, and its
//! reply reaches the call before the call returns. PostgreSQL runs a
//! statement in autocommit from one snapshot, taken when it starts, and
//! commits it as a whole; so whatever it tells a call happened at an
//! instant inside that call, exactly as with a statement of its own. A call
//! never joins a statement already in flight: its snapshot may predate the
//! call and miss a change acknowledged before the call began. Calls
//! answered by one statement share its instant, which is a legal order for
//! concurrent calls. What each kind of work adds to this is argued in its
//! own module.
//!
//! # Stalls
//!
//! A statement in flight for the stall timeout (`DATABASE_STALL_TIMEOUT`,
//! 100 ms by default) stops counting against
//! [`Work::IN_FLIGHT`]: what is queued goes out without it. A Link that
//! waits on a key another transaction holds (an import's batch, a replica's
//! Link, someone's open transaction) then holds up nobody but the Links it
//! answers. This is no batching timer: no call ever waits for it, it only
//! bounds how long calls wait behind a statement that is not theirs.
//!
//! # Bounds
//!
//! A queued call waits no longer than its own deadline, and a call whose
//! deadline passed (or whose caller left) before its statement went out is
//! not sent. A shared statement is bounded by the latest deadline among
//! the calls it answers (and, as every statement, closes its connection if
//! cut off). When the database stops answering the health supervisor calls
//! [`Lane::forget`]: statements stuck on the old connections stop counting,
//! so new calls are not held behind them.

mod links;
mod reads;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use sea_orm::{DbErr, RuntimeErr};
use tokio::{sync::oneshot, time::Instant};

use super::{errors::timed_out, postgres::Pool};

pub(super) use links::{LinkRequest, Links};
pub(super) use reads::Reads;

/// What a lane coalesces: how calls are grouped and answered.
pub(super) trait Work: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;

    /// What a shared statement holds while it is in flight (released when
    /// it is dropped, after the statement ended).
    type Claim: Send + 'static;

    /// Statements in flight before calls start to queue.
    const IN_FLIGHT: usize;

    /// For metrics: `link`, `get_by_user`, `get_by_customer`.
    fn name(&self) -> &'static str;

    /// Moves the calls the next shared statement answers out of `queue`
    /// (never empty), or `None` when none of them may go out before a
    /// statement in flight ends.
    fn next_batch(
        &self,
        queue: &mut VecDeque<Call<Self>>,
    ) -> Option<(Vec<Call<Self>>, Self::Claim)>;

    /// The statements in flight are no longer counted ([`Lane::forget`]):
    /// neither are their claims.
    fn forget(&self) {}

    /// Sends one statement answering every call of `batch` (never empty),
    /// and answers each of them.
    fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) -> impl Future<Output = ()> + Send;
}

/// One call waiting for its answer.
pub(super) struct Call<W: Work + ?Sized> {
    pub request: W::Request,
    pub until: Instant,
    reply: oneshot::Sender<Result<W::Answer, DbErr>>,
}

impl<W: Work + ?Sized> Call<W> {
    /// A call, and where its answer arrives.
    fn new(
        request: W::Request,
        until: Instant,
    ) -> (Self, oneshot::Receiver<Result<W::Answer, DbErr>>) {
        let (reply, answer) = oneshot::channel();
        (
            Call {
                request,
                until,
                reply,
            },
            answer,
        )
    }

    pub fn answer(self, answer: Result<W::Answer, DbErr>) {
        // A caller that left needs no answer.
        let _ = self.reply.send(answer);
    }
}

/// The statements of one kind of work, and the calls waiting for them.
pub(super) struct Lane<W: Work> {
    work: W,
    /// How long a statement may be in flight before it stops holding up
    /// the calls queued behind it: well above a statement's few
    /// milliseconds, so that under load it changes nothing.
    stall_timeout: Duration,
    state: Mutex<State<W>>,
}

impl<W: Work> std::fmt::Debug for Lane<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Lane")
            .field("work", &self.work.name())
            .field("in_flight", &state.in_flight)
            .field("queued", &state.queued.len())
            .finish()
    }
}

struct State<W: Work> {
    /// Statements in flight that count against [`Work::IN_FLIGHT`].
    in_flight: usize,
    /// Bumped by `forget`: statements of older generations no longer count.
    generation: u64,
    /// Calls waiting for the next statement, oldest first.
    queued: VecDeque<Call<W>>,
}

/// A statement in flight; when it ends (even if its future is dropped) the
/// lane sends what is queued.
struct InFlight<W: Work> {
    lane: Arc<Lane<W>>,
    pool: Pool,
    generation: u64,
    /// Still counted against [`Work::IN_FLIGHT`].
    counted: bool,
}

impl<W: Work> InFlight<W> {
    /// Stops counting this statement: its place goes to what is queued.
    fn release(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.lane.finished(&self.pool, self.generation);
        }
    }
}

impl<W: Work> Drop for InFlight<W> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<W: Work> Lane<W> {
    pub fn new(work: W, stall_timeout: Duration) -> Self {
        Self {
            work,
            stall_timeout,
            state: Mutex::new(State {
                in_flight: 0,
                generation: 0,
                queued: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<W>> {
        // Every critical section leaves the state consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answers `request` by `until`: with a statement of its own when a
    /// place is free, otherwise with the next shared one.
    pub async fn call(
        self: &Arc<Self>,
        pool: &Pool,
        request: W::Request,
        until: Instant,
    ) -> Result<W::Answer, DbErr> {
        let (call, answer) = Call::new(request, until);
        let alone = {
            let mut state = self.lock();
            if state.in_flight < W::IN_FLIGHT {
                state.in_flight += 1;
                Some((call, state.generation))
            } else {
                state.queued.push_back(call);
                metrics::gauge!(QUEUED, "op" => self.work.name()).increment(1.0);
                None
            }
        };
        if let Some((call, generation)) = alone {
            let in_flight = InFlight {
                lane: self.clone(),
                pool: pool.clone(),
                generation,
                counted: true,
            };
            self.run_counted(pool, vec![call], in_flight, None).await;
        }
        wait(answer, until).await
    }

    /// Answers `request` with a statement of its own, at once, outside the
    /// count: for a call that must not share (a Link run again after its
    /// shared statement was aborted).
    pub async fn call_alone(
        &self,
        pool: &Pool,
        request: W::Request,
        until: Instant,
    ) -> Result<W::Answer, DbErr> {
        let (call, answer) = Call::new(request, until);
        self.run(pool, vec![call]).await;
        wait(answer, until).await
    }

    /// Runs a statement that holds a place in flight, giving the place up
    /// if it stalls. Whatever it claimed is released when it ends, before
    /// the next statement forms.
    async fn run_counted(
        self: &Arc<Self>,
        pool: &Pool,
        batch: Vec<Call<W>>,
        mut in_flight: InFlight<W>,
        claim: Option<W::Claim>,
    ) {
        let run = self.run(pool, batch);
        tokio::pin!(run);
        let stalled = tokio::time::timeout(self.stall_timeout, &mut run)
            .await
            .is_err();
        if stalled {
            in_flight.release();
            run.await;
        }
        drop(claim);
        if stalled {
            // Its place went to others long ago; what waited on its keys
            // goes out now if a place is free.
            self.kick(pool);
        } else {
            // Gives the place to what is queued.
            drop(in_flight);
        }
    }

    /// Sends what is queued if a place is free.
    fn kick(self: &Arc<Self>, pool: &Pool) {
        let mut state = self.lock();
        if state.in_flight < W::IN_FLIGHT && !state.queued.is_empty() {
            state.in_flight += 1;
            self.send_queued(state, pool);
        }
    }

    async fn run(&self, pool: &Pool, batch: Vec<Call<W>>) {
        metrics::histogram!(CALLS_PER_STATEMENT, "op" => self.work.name())
            .record(batch.len() as f64);
        self.work.run(pool, batch).await;
    }

    /// A statement of `generation` ended: what is queued, if anything, goes
    /// out as the next statement, which takes over its place in flight.
    fn finished(self: &Arc<Self>, pool: &Pool, generation: u64) {
        let state = self.lock();
        if generation != state.generation {
            return;
        }
        self.send_queued(state, pool);
    }

    /// Sends what is queued as the next statement, in the place of one that
    /// ended (or gives the place back when nothing is queued).
    fn send_queued(self: &Arc<Self>, mut state: std::sync::MutexGuard<'_, State<W>>, pool: &Pool) {
        let now = Instant::now();
        // Calls that gave up (their caller left, or their deadline passed)
        // are not sent.
        state
            .queued
            .retain(|call| !call.reply.is_closed() && call.until > now);
        let next = if state.queued.is_empty() {
            None
        } else {
            self.work.next_batch(&mut state.queued)
        };
        metrics::gauge!(QUEUED, "op" => self.work.name()).set(state.queued.len() as f64);
        let Some((batch, claim)) = next else {
            // Nothing may go out now: give the place back. Calls left queued
            // wait for a statement in flight, whose end sends them.
            state.in_flight -= 1;
            return;
        };
        let in_flight = InFlight {
            lane: self.clone(),
            pool: pool.clone(),
            generation: state.generation,
            counted: true,
        };
        drop(state);
        tokio::spawn(async move {
            let (lane, pool) = (in_flight.lane.clone(), in_flight.pool.clone());
            lane.run_counted(&pool, batch, in_flight, Some(claim)).await;
        });
    }

    /// Stops counting the statements in flight now (they are stuck on a
    /// database that stopped answering) and sends the queued calls at once.
    pub fn forget(self: &Arc<Self>, pool: &Pool) {
        let mut state = self.lock();
        state.generation += 1;
        self.work.forget();
        // One place, which `send_queued` takes or gives back.
        state.in_flight = 1;
        self.send_queued(state, pool);
    }
}

async fn wait<A>(answer: oneshot::Receiver<Result<A, DbErr>>, until: Instant) -> Result<A, DbErr> {
    match tokio::time::timeout_at(until, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_dropped)) => Err(DbErr::Conn(RuntimeErr::Internal(
            "a coalesced statement ended without an answer".into(),
        ))),
        Err(_) => Err(timed_out("waiting for a coalesced statement")),
    }
}

/// Calls waiting for a statement, by `op` (a gauge).
pub const QUEUED: &str = "customer_mapping_db_queued_calls";
/// Calls answered per statement sent, by `op` (a summary: its `_count` is
/// the statements, its `_sum` the calls).
pub const CALLS_PER_STATEMENT: &str = "customer_mapping_db_calls_per_statement";

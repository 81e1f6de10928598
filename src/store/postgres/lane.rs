//! Concurrent calls coalesced into shared statements: Gets (`gets.rs`) and
//! Links (`links.rs`).
//!
//! A [`Lane`] keeps one statement in flight. A call that finds the lane
//! free sends its own statement at once: a lone call waits for nothing, and
//! there is no timer. A call that arrives while a statement is in flight
//! queues; when that statement ends, the queued calls go out together as
//! the next one, so a busy server answers many calls per round trip. A
//! queued call is only ever answered by a statement sent after it joined:
//! why that keeps every answer the state at one instant inside its call is
//! argued in `link.rs`.
//!
//! # Links sharing a statement
//!
//! No two Links of one statement share a user or a customer (the domain's
//! batching rule, `mapping::KeySet`), and a queued Link whose key is
//! already taken by an earlier queued Link waits, so contenders go in
//! arrival order. No key is in two shared statements in flight either: a
//! statement inserting several rows holds the keys of those it inserted
//! while it waits on a key another transaction holds, and two such
//! statements waiting on each other would deadlock. A lone statement never
//! waits while holding a key (its speculative insertion backs out first),
//! so it claims none.
//!
//! # Stalls and bounds
//!
//! A statement in flight for the stall timeout (`DATABASE_STALL_TIMEOUT`)
//! stops holding the lane: what is queued goes out without it, so a Link
//! waiting on a lock holds up nobody but the Links it answers. No call
//! ever waits for this timer; it only bounds how long calls wait behind a
//! statement that is not theirs. A queued call waits no longer than its own
//! deadline and is not sent once its caller left. A shared statement is
//! bounded by the latest deadline among its calls. When the pool stops
//! trusting its connections (its generation changes: the database stopped
//! answering, or a standby was reached) the statements in flight stop
//! counting, so new calls are not held behind them.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use sea_orm::{DbErr, RuntimeErr};
use tokio::{sync::oneshot, time::Instant};
use tracing::Instrument;

use super::pool::Pool;
use crate::{
    mapping::{KeyFingerprints, KeySet, LinkKeys},
    store::errors::timed_out,
    telemetry::{
        metrics::{CALLS_PER_STATEMENT, QUEUED_CALLS},
        traces,
    },
};

/// What a lane coalesces: how calls are answered.
pub(super) trait Work: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;

    /// Calls one statement answers at most.
    const MAX_CALLS_PER_STATEMENT: usize;

    /// For metrics: `link`, `get_by_user`, `get_by_customer`.
    fn name(&self) -> &'static str;

    /// The account, user and customer a request writes, when it writes
    /// (Links).
    fn keys(request: &Self::Request) -> Option<(&str, &str, &str)>;

    /// Sends one statement answering every call of `batch` (never empty),
    /// and answers each of them.
    fn run(&self, pool: &Pool, batch: Vec<Call<Self>>) -> impl Future<Output = ()> + Send;
}

/// One call waiting for its answer.
pub(super) struct Call<W: Work + ?Sized> {
    pub request: W::Request,
    pub until: Instant,
    keys: Option<LinkKeys>,
    /// The call's span: the statement that answers it links to it.
    span: tracing::Span,
    reply: oneshot::Sender<Result<W::Answer, DbErr>>,
}

impl<W: Work + ?Sized> Call<W> {
    pub fn answer(self, answer: Result<W::Answer, DbErr>) {
        // A caller that left needs no answer.
        let _ = self.reply.send(answer);
    }

    fn gave_up(&self, now: Instant) -> bool {
        self.reply.is_closed() || self.until <= now
    }
}

/// The statements of one kind of work, and the calls waiting for them.
pub(super) struct Lane<W: Work> {
    work: W,
    pool: Pool,
    stall_timeout: Duration,
    fingerprints: KeyFingerprints,
    state: Mutex<State<W>>,
}

impl<W: Work> std::fmt::Debug for Lane<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Lane")
            .field("work", &self.work.name())
            .field("busy", &state.busy)
            .field("queued", &state.queued.len())
            .finish()
    }
}

struct State<W: Work> {
    /// A statement holds the lane.
    busy: bool,
    /// The pool's generation the state belongs to: statements of another
    /// generation no longer count, nor do their keys.
    generation: u64,
    /// Keys of the shared statements in flight.
    claimed: KeySet,
    /// Calls waiting for the next statement, oldest first.
    queued: VecDeque<Call<W>>,
}

/// A statement in flight. When it ends (even if its future is dropped) its
/// keys are released and, if it still holds the lane, what is queued goes
/// out.
struct InFlight<W: Work> {
    lane: Arc<Lane<W>>,
    generation: u64,
    holds_lane: bool,
    claimed: Vec<LinkKeys>,
}

impl<W: Work> InFlight<W> {
    /// Stops holding the lane (a stall): its place goes to what is queued;
    /// its keys stay claimed until it ends.
    fn stop_holding_lane(&mut self) {
        if std::mem::take(&mut self.holds_lane) {
            let mut state = self.lane.lock_current();
            if state.generation == self.generation {
                state.busy = false;
            }
            self.lane.send_queued(state);
        }
    }
}

impl<W: Work> Drop for InFlight<W> {
    fn drop(&mut self) {
        let mut state = self.lane.lock_current();
        if state.generation == self.generation {
            for keys in self.claimed.drain(..) {
                state.claimed.remove(keys);
            }
            if self.holds_lane {
                state.busy = false;
            }
        }
        self.lane.send_queued(state);
    }
}

impl<W: Work> Lane<W> {
    pub fn new(work: W, pool: Pool, stall_timeout: Duration) -> Arc<Self> {
        let generation = pool.generation();
        Arc::new(Self {
            work,
            pool,
            stall_timeout,
            fingerprints: KeyFingerprints::default(),
            state: Mutex::new(State {
                busy: false,
                generation,
                claimed: KeySet::default(),
                queued: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<W>> {
        // Every critical section leaves the state consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state, reset first if the pool's generation moved on: the
    /// statements in flight then are stuck on connections no longer
    /// trusted, and hold neither the lane nor their keys.
    fn lock_current(&self) -> MutexGuard<'_, State<W>> {
        let mut state = self.lock();
        let current = self.pool.generation();
        if state.generation != current {
            state.generation = current;
            state.busy = false;
            state.claimed.clear();
        }
        state
    }

    /// Answers `request` by `until`: with a statement of its own when the
    /// lane is free, otherwise with the next shared one.
    pub async fn call(
        self: &Arc<Self>,
        request: W::Request,
        until: Instant,
    ) -> Result<W::Answer, DbErr> {
        let keys = W::keys(&request)
            .map(|(account, user, customer)| self.fingerprints.of(account, user, customer));
        let (reply, answer) = oneshot::channel();
        let call = Call {
            request,
            until,
            keys,
            span: traces::call_span(),
            reply,
        };
        let alone = {
            let mut state = self.lock_current();
            if state.busy {
                state.queued.push_back(call);
                metrics::gauge!(QUEUED_CALLS, "op" => self.work.name()).increment(1.0);
                None
            } else {
                state.busy = true;
                Some((call, state.generation))
            }
        };
        if let Some((call, generation)) = alone {
            let in_flight = InFlight {
                lane: self.clone(),
                generation,
                holds_lane: true,
                claimed: Vec::new(),
            };
            self.run_in_flight(vec![call], in_flight).await;
        }
        wait(answer, until).await
    }

    /// Answers `request` with a statement of its own, at once, holding
    /// nothing: for a Link run again after its attempt was aborted, which
    /// must not meet the same Links in one statement again.
    pub async fn call_alone(
        &self,
        request: W::Request,
        until: Instant,
    ) -> Result<W::Answer, DbErr> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            request,
            until,
            keys: None,
            span: traces::call_span(),
            reply,
        };
        self.run(vec![call]).await;
        wait(answer, until).await
    }

    /// Runs a statement, giving up the lane if it stalls.
    async fn run_in_flight(self: &Arc<Self>, batch: Vec<Call<W>>, mut in_flight: InFlight<W>) {
        let run = self.run(batch);
        tokio::pin!(run);
        if tokio::time::timeout(self.stall_timeout, &mut run)
            .await
            .is_err()
        {
            in_flight.stop_holding_lane();
            run.await;
        }
        drop(in_flight);
    }

    async fn run(&self, batch: Vec<Call<W>>) {
        metrics::histogram!(CALLS_PER_STATEMENT, "op" => self.work.name())
            .record(batch.len() as f64);
        // Its own span, whichever task sends it (a queued batch goes out
        // from a task of its own): one statement, linked to every call.
        let span = traces::shared_statement_span(self.work.name(), batch.iter().map(|c| &c.span));
        self.work.run(&self.pool, batch).instrument(span).await;
    }

    /// When the lane is free, sends what is queued as the next statement.
    fn send_queued(self: &Arc<Self>, mut state: MutexGuard<'_, State<W>>) {
        if state.busy {
            return;
        }
        let now = Instant::now();
        state.queued.retain(|call| !call.gave_up(now));
        let (batch, claimed) = next_batch::<W>(&mut state);
        metrics::gauge!(QUEUED_CALLS, "op" => self.work.name()).set(state.queued.len() as f64);
        if batch.is_empty() {
            // Calls left queued wait for a statement in flight, whose end
            // sends them.
            return;
        }
        state.busy = true;
        let in_flight = InFlight {
            lane: self.clone(),
            generation: state.generation,
            holds_lane: true,
            claimed,
        };
        drop(state);
        tokio::spawn(async move {
            let lane = in_flight.lane.clone();
            lane.run_in_flight(batch, in_flight).await;
        });
    }

    /// Sends what is queued now if the lane is free (the pool has just
    /// stopped trusting its connections: the statements on them are stuck).
    pub fn kick(self: &Arc<Self>) {
        let state = self.lock_current();
        self.send_queued(state);
    }
}

/// Moves the calls the next statement answers out of the queue, with the
/// keys it claims: up to the work's maximum, no two sharing a key, none
/// sharing a key with a shared statement in flight, and none overtaking an
/// earlier queued call of the same key.
fn next_batch<W: Work>(state: &mut State<W>) -> (Vec<Call<W>>, Vec<LinkKeys>) {
    let mut seen = KeySet::default();
    let mut batch = Vec::new();
    let mut claimed = Vec::new();
    let mut left = VecDeque::new();
    for call in state.queued.drain(..) {
        let take = batch.len() < W::MAX_CALLS_PER_STATEMENT
            && call
                .keys
                .is_none_or(|keys| state.claimed.admits(keys) && seen.admits(keys));
        if let Some(keys) = call.keys {
            seen.add(keys);
            if take {
                claimed.push(keys);
            }
        }
        if take {
            batch.push(call);
        } else {
            left.push_back(call);
        }
    }
    state.queued = left;
    for keys in &claimed {
        state.claimed.add(*keys);
    }
    (batch, claimed)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write whose request is its user and customer.
    struct TestLink;

    impl Work for TestLink {
        type Request = (String, String);
        type Answer = ();
        const MAX_CALLS_PER_STATEMENT: usize = 4;

        fn name(&self) -> &'static str {
            "test"
        }

        fn keys(request: &(String, String)) -> Option<(&str, &str, &str)> {
            Some(("", &request.0, &request.1))
        }

        async fn run(&self, _: &Pool, _: Vec<Call<Self>>) {}
    }

    struct Queue {
        fingerprints: KeyFingerprints,
        state: State<TestLink>,
    }

    impl Queue {
        fn new() -> Self {
            Self {
                fingerprints: KeyFingerprints::default(),
                state: State {
                    busy: false,
                    generation: 0,
                    claimed: KeySet::default(),
                    queued: VecDeque::new(),
                },
            }
        }

        fn push(&mut self, pairs: &[&str]) {
            for pair in pairs {
                let (user, customer) = pair.split_once(':').expect("user:customer");
                let request = (user.to_owned(), customer.to_owned());
                let keys = Some(self.fingerprints.of("", user, customer));
                let (reply, _) = oneshot::channel();
                self.state.queued.push_back(Call {
                    request,
                    until: Instant::now(),
                    keys,
                    span: tracing::Span::none(),
                    reply,
                });
            }
        }

        /// The next statement's pairs, and the keys it claims.
        fn next(&mut self) -> (Vec<String>, Vec<LinkKeys>) {
            let (batch, claimed) = next_batch(&mut self.state);
            (pairs(batch.iter()), claimed)
        }

        fn queued(&self) -> Vec<String> {
            pairs(self.state.queued.iter())
        }

        fn end(&mut self, claimed: Vec<LinkKeys>) {
            for keys in claimed {
                self.state.claimed.remove(keys);
            }
        }
    }

    fn pairs<'a>(calls: impl Iterator<Item = &'a Call<TestLink>>) -> Vec<String> {
        calls
            .map(|call| format!("{}:{}", call.request.0, call.request.1))
            .collect()
    }

    #[test]
    fn a_statement_holds_no_two_links_sharing_a_key_and_keeps_contenders_in_order() {
        let mut queue = Queue::new();
        queue.push(&["u1:c1", "u2:c2", "u1:c3", "u3:c3", "u4:c1", "u5:c5"]);
        // u1:c3 waits (u1 taken), u3:c3 waits behind it (c3), u4:c1 (c1).
        let (first, claimed) = queue.next();
        assert_eq!(first, ["u1:c1", "u2:c2", "u5:c5"]);
        assert_eq!(queue.queued(), ["u1:c3", "u3:c3", "u4:c1"]);
        // While the first is in flight, its keys hold back every Link left.
        assert!(queue.next().0.is_empty());
        queue.end(claimed);
        let (second, claimed) = queue.next();
        assert_eq!(second, ["u1:c3", "u4:c1"]);
        queue.end(claimed);
        assert_eq!(queue.next().0, ["u3:c3"]);
        assert!(queue.queued().is_empty());
    }

    #[test]
    fn two_shared_statements_in_flight_share_no_key() {
        let mut queue = Queue::new();
        queue.push(&["u1:c1", "u2:c2"]);
        let (first, _in_flight) = queue.next();
        assert_eq!(first, ["u1:c1", "u2:c2"]);
        queue.push(&["u3:c1", "u2:c4", "u5:c5"]);
        assert_eq!(queue.next().0, ["u5:c5"]);
        assert_eq!(queue.queued(), ["u3:c1", "u2:c4"]);
    }

    #[test]
    fn a_statement_is_bounded() {
        let mut queue = Queue::new();
        queue.push(&["u1:c1", "u2:c2", "u3:c3", "u4:c4", "u5:c5", "u6:c6"]);
        assert_eq!(queue.next().0.len(), TestLink::MAX_CALLS_PER_STATEMENT);
        assert_eq!(queue.queued(), ["u5:c5", "u6:c6"]);
    }

    #[test]
    fn statements_on_forgotten_connections_hold_neither_the_lane_nor_keys() {
        let limits = crate::store::postgres::pool::Limits {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        let pool = Pool::new("postgres://nobody@127.0.0.1:1/none", limits).expect("a pool");
        let lane = Lane::new(TestLink, pool.clone(), Duration::from_secs(1));
        let keys = lane.fingerprints.of("", "u1", "c1");
        {
            let mut state = lane.lock_current();
            state.busy = true;
            state.claimed.add(keys);
        }
        assert!(lane.lock_current().busy, "nothing changed yet");
        pool.forget_connections();
        let state = lane.lock_current();
        assert!(!state.busy);
        assert!(state.claimed.admits(keys));
    }
}

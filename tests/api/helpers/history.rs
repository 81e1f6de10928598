//! Recording what concurrent clients saw, and checking that it is
//! linearizable against the sequential model of the service (a partial
//! bijection between users and customers).
//!
//! The checker is the Wing & Gong search with Lowe's memoization: find an
//! order of the operations, each placed between its invocation and its
//! completion, in which the model gives every recorded answer. Operations
//! whose outcome is unknown (UNAVAILABLE, DEADLINE_EXCEEDED, a dropped
//! connection, ABORTED) "may or may not have happened", as in Jepsen: they
//! can take effect at any point after their invocation, or never.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// See [`run_load`]; the default of [`Load::pause_after_unknown`].
const PAUSE_AFTER_UNKNOWN: Duration = Duration::from_millis(100);

/// A bound on the search, so that a history too indeterminate to check
/// fails the test with a reason instead of exhausting memory.
const MAX_SEARCH_STATES: usize = 2_000_000;

use customer_mapping::proto::{
    GetRequest, LinkRequest, UnlinkRequest, customer_mapping_client::CustomerMappingClient,
    get_request, unlink_request,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// Users and customers are small integers: `user-{i}` and `cus_{i}`.
pub type Key = u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Link(Key, Key),
    GetByUser(Key),
    GetByCustomer(Key),
    UnlinkByUser(Key),
    UnlinkByCustomer(Key),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Created,
    AlreadyLinked,
    /// USER_ALREADY_LINKED, naming the user's existing customer.
    UserTaken(Key),
    /// CUSTOMER_ALREADY_LINKED, naming the customer's existing user.
    CustomerTaken(Key),
    /// Get or Unlink returned this (user, customer).
    Mapping(Key, Key),
    NotFound,
    /// May or may not have taken effect.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub op: Op,
    pub outcome: Outcome,
    /// Nanoseconds since the history began.
    pub invoked: u64,
    /// `u64::MAX` when the outcome is unknown: it may take effect any time.
    pub completed: u64,
}

#[derive(Debug, Default, Clone)]
pub struct History {
    pub events: Vec<Event>,
}

impl History {
    pub fn unknown(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e.outcome == Outcome::Unknown)
            .count()
    }

    pub fn merge(histories: impl IntoIterator<Item = History>) -> History {
        History {
            events: histories.into_iter().flat_map(|h| h.events).collect(),
        }
    }
}

/// The sequential model: `user_to_customer[u]` is `u`'s customer, if any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Model {
    user_to_customer: Vec<Option<Key>>,
}

impl Model {
    pub fn new(users: usize) -> Self {
        Self {
            user_to_customer: vec![None; users],
        }
    }

    fn user_of(&self, customer: Key) -> Option<Key> {
        self.user_to_customer
            .iter()
            .position(|c| *c == Some(customer))
            .map(|u| u as Key)
    }

    /// Applies `op` and returns what the service must answer.
    pub fn apply(&mut self, op: Op) -> Outcome {
        match op {
            Op::Link(u, c) => match self.user_to_customer[u as usize] {
                Some(existing) if existing == c => Outcome::AlreadyLinked,
                Some(existing) => Outcome::UserTaken(existing),
                None => match self.user_of(c) {
                    Some(holder) => Outcome::CustomerTaken(holder),
                    None => {
                        self.user_to_customer[u as usize] = Some(c);
                        Outcome::Created
                    }
                },
            },
            Op::GetByUser(u) => self.user_to_customer[u as usize]
                .map_or(Outcome::NotFound, |c| Outcome::Mapping(u, c)),
            Op::GetByCustomer(c) => self
                .user_of(c)
                .map_or(Outcome::NotFound, |u| Outcome::Mapping(u, c)),
            Op::UnlinkByUser(u) => match self.user_to_customer[u as usize].take() {
                Some(c) => Outcome::Mapping(u, c),
                None => Outcome::NotFound,
            },
            Op::UnlinkByCustomer(c) => match self.user_of(c) {
                Some(u) => {
                    self.user_to_customer[u as usize] = None;
                    Outcome::Mapping(u, c)
                }
                None => Outcome::NotFound,
            },
        }
    }

    /// The pairs linked in this state.
    pub fn pairs(&self) -> HashSet<(Key, Key)> {
        self.user_to_customer
            .iter()
            .enumerate()
            .filter_map(|(u, c)| c.map(|c| (u as Key, c)))
            .collect()
    }
}

/// Searches for a linearization of `history` starting from `initial`.
/// Returns the final model state of one linearization, or `None` when there
/// is none (the history is not linearizable). `final_states`, when given,
/// must contain the linearization's final state (the table as read after
/// the run), which also pins down whether unknown operations happened.
pub fn linearize(
    history: &History,
    initial: Model,
    final_state: Option<&HashSet<(Key, Key)>>,
) -> Option<Model> {
    // A read whose answer was lost changed nothing: leave it out.
    let mut events: Vec<Event> = history
        .events
        .iter()
        .filter(|e| {
            !(e.outcome == Outcome::Unknown
                && matches!(e.op, Op::GetByUser(_) | Op::GetByCustomer(_)))
        })
        .copied()
        .collect();
    events.sort_by_key(|e| e.invoked);
    let n = events.len();
    let words = n.div_ceil(64);
    let required = events
        .iter()
        .filter(|e| e.outcome != Outcome::Unknown)
        .count();

    // Explicit DFS stack: (linearized set, count of required ones done, state).
    let mut stack = vec![(vec![0u64; words], 0usize, initial)];
    let mut seen: HashSet<(Vec<u64>, Model)> = HashSet::new();
    while let Some((done, required_done, state)) = stack.pop() {
        if required_done == required && final_state.is_none_or(|pairs| state.pairs() == *pairs) {
            return Some(state);
        }
        if !seen.insert((done.clone(), state.clone())) {
            continue;
        }
        assert!(
            seen.len() < MAX_SEARCH_STATES,
            "the checker gave up after {MAX_SEARCH_STATES} states ({} unknown operations): \
             the scenario produces too many indeterminate operations to check",
            n - required
        );
        // An operation may go next iff no pending operation completed before
        // it was invoked.
        let horizon = events
            .iter()
            .enumerate()
            .filter(|(i, _)| done[i / 64] & (1 << (i % 64)) == 0)
            .map(|(_, e)| e.completed)
            .min()
            .unwrap_or(u64::MAX);
        for (i, event) in events.iter().enumerate() {
            if event.invoked > horizon {
                break; // sorted by invocation
            }
            if done[i / 64] & (1 << (i % 64)) != 0 {
                continue;
            }
            let mut next = state.clone();
            let answer = next.apply(event.op);
            if event.outcome == Outcome::Unknown && next == state {
                // Happening now would change nothing: leave it pending, it
                // may still take effect later (or never).
                continue;
            }
            if event.outcome != Outcome::Unknown && answer != event.outcome {
                continue;
            }
            let mut next_done = done.clone();
            next_done[i / 64] |= 1 << (i % 64);
            let next_required = required_done + usize::from(event.outcome != Outcome::Unknown);
            stack.push((next_done, next_required, next));
        }
    }
    None
}

/// How a load of random operations is run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub operations_per_client: usize,
    pub users: usize,
    pub customers: usize,
    /// Longest per-call deadline; each call draws its own between an eighth
    /// of this and this. A call past it counts as unknown.
    pub deadline: Duration,
    pub seed: u64,
    /// How long a client waits after an unknown outcome. Longer outages
    /// need longer pauses to keep the checker's search small.
    pub pause_after_unknown: Duration,
}

impl Load {
    pub fn small(seed: u64) -> Self {
        Self {
            clients: 8,
            operations_per_client: 60,
            users: 3,
            customers: 3,
            deadline: Duration::from_secs(5),
            seed,
            pause_after_unknown: PAUSE_AFTER_UNKNOWN,
        }
    }
}

/// Runs `load` with clients spread over `addrs` (one HTTP/2 connection each)
/// and returns what they saw. Each client stops early once `stop` is set.
/// After an unknown outcome a client pauses briefly: during an outage that
/// keeps the number of "may or may not have happened" operations, which the
/// checker must try both ways, small.
pub async fn run_load(
    addrs: &[SocketAddr],
    load: Load,
    started: Instant,
    stop: Option<Arc<AtomicBool>>,
) -> History {
    let clients = (0..load.clients).map(|i| {
        let addr = addrs[i % addrs.len()];
        let stop = stop.clone();
        tokio::spawn(async move {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("a URI")
                .connect_lazy();
            let mut client = CustomerMappingClient::new(channel);
            let mut rng = StdRng::seed_from_u64(load.seed.wrapping_add(i as u64));
            let mut history = History::default();
            for _ in 0..load.operations_per_client {
                if stop
                    .as_ref()
                    .is_some_and(|stop| stop.load(Ordering::Relaxed))
                {
                    break;
                }
                let u = rng.random_range(0..load.users) as Key;
                let c = rng.random_range(0..load.customers) as Key;
                let op = match rng.random_range(0..10) {
                    0..=3 => Op::Link(u, c),
                    4 => Op::GetByUser(u),
                    5 => Op::GetByCustomer(c),
                    6..=7 => Op::UnlinkByUser(u),
                    _ => Op::UnlinkByCustomer(c),
                };
                let deadline = rng.random_range(load.deadline / 8..=load.deadline);
                let invoked = started.elapsed().as_nanos() as u64;
                let outcome = call(&mut client, op, deadline).await;
                let completed = if outcome == Outcome::Unknown {
                    tokio::time::sleep(load.pause_after_unknown).await;
                    u64::MAX
                } else {
                    started.elapsed().as_nanos() as u64
                };
                history.events.push(Event {
                    op,
                    outcome,
                    invoked,
                    completed,
                });
            }
            history
        })
    });
    History::merge(
        futures::future::join_all(clients)
            .await
            .into_iter()
            .map(|h| h.expect("no client panicked")),
    )
}

fn user(k: Key) -> String {
    format!("user-{k}")
}
fn customer(k: Key) -> String {
    format!("cus_{k}")
}
fn parse_user(s: &str) -> Key {
    s.strip_prefix("user-")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("unexpected user {s:?}"))
}
fn parse_customer(s: &str) -> Key {
    s.strip_prefix("cus_")
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("unexpected customer {s:?}"))
}

async fn call(client: &mut CustomerMappingClient<Channel>, op: Op, deadline: Duration) -> Outcome {
    fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        request
    }
    let mapping = |m: Option<customer_mapping::proto::Mapping>| {
        let m = m.expect("a mapping");
        Outcome::Mapping(
            parse_user(&m.user_id),
            parse_customer(&m.stripe_customer_id),
        )
    };
    let result = match op {
        Op::Link(u, c) => client
            .link(with_deadline(
                LinkRequest {
                    user_id: user(u),
                    stripe_customer_id: customer(c),
                },
                deadline,
            ))
            .await
            .map(|r| {
                if r.into_inner().created {
                    Outcome::Created
                } else {
                    Outcome::AlreadyLinked
                }
            }),
        Op::GetByUser(u) => client
            .get(with_deadline(
                GetRequest {
                    key: Some(get_request::Key::UserId(user(u))),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::GetByCustomer(c) => client
            .get(with_deadline(
                GetRequest {
                    key: Some(get_request::Key::StripeCustomerId(customer(c))),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkByUser(u) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::UserId(user(u))),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkByCustomer(c) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::StripeCustomerId(customer(c))),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
    };
    result.unwrap_or_else(|status| error_outcome(&status))
}

fn error_outcome(status: &Status) -> Outcome {
    match status.code() {
        Code::AlreadyExists => {
            let info = status.get_details_error_info().expect("ErrorInfo");
            match info.reason.as_str() {
                "USER_ALREADY_LINKED" => {
                    Outcome::UserTaken(parse_customer(&info.metadata["stripeCustomerId"]))
                }
                "CUSTOMER_ALREADY_LINKED" => {
                    Outcome::CustomerTaken(parse_user(&info.metadata["userId"]))
                }
                other => panic!("unexpected reason {other}"),
            }
        }
        Code::NotFound => Outcome::NotFound,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown => Outcome::Unknown,
        _ => panic!("an answer no fault excuses: {status:?}"),
    }
}

/// The table as `(user, customer)` keys.
pub fn table_pairs(rows: Vec<(String, String)>) -> HashSet<(Key, Key)> {
    rows.into_iter()
        .map(|(u, c)| (parse_user(&u), parse_customer(&c)))
        .collect()
}

/// Checks `history` and the final table; panics with a report otherwise.
/// Returns (operations checked, of which unknown).
pub fn assert_linearizable(
    scenario: &str,
    history: &History,
    users: usize,
    table: &HashSet<(Key, Key)>,
) -> (usize, usize) {
    let total = history.events.len();
    let unknown = history.unknown();
    if linearize(history, Model::new(users), Some(table)).is_none() {
        let mut events = history.events.clone();
        events.sort_by_key(|e| e.invoked);
        let listing: Vec<String> = events
            .iter()
            .map(|e| {
                let completed = if e.completed == u64::MAX {
                    "?".to_owned()
                } else {
                    format!("{:.3}", e.completed as f64 / 1e6)
                };
                format!(
                    "{:>10.3} .. {:>10} ms  {:?} -> {:?}",
                    e.invoked as f64 / 1e6,
                    completed,
                    e.op,
                    e.outcome
                )
            })
            .collect();
        panic!(
            "{scenario}: history of {total} operations ({unknown} unknown) is not linearizable \
             with final table {table:?}:\n{}",
            listing.join("\n")
        );
    }
    super::report(&format!(
        "{scenario}: {total} operations checked, {unknown} indeterminate: linearizable"
    ));
    (total, unknown)
}

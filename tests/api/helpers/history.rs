//! Recording what concurrent clients saw, and checking that it is
//! linearizable against the sequential model of the service (a partial
//! bijection between users and customers in each Stripe account, and each
//! user's generation: how many times it was unlinked there).
//!
//! The checker is the Wing & Gong search with Lowe's memoization: find an
//! order of the operations, each placed between its invocation and its
//! completion, in which the model gives every recorded answer. Operations
//! whose outcome is unknown (UNAVAILABLE, DEADLINE_EXCEEDED, a dropped
//! connection, ABORTED) "may or may not have happened", as in Jepsen: they
//! can take effect at any point after their invocation, or never.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// See [`run_load`]; the default of [`Load::pause_after_unknown`].
const PAUSE_AFTER_UNKNOWN: Duration = Duration::from_millis(100);

/// A bound on the search, so that a history too indeterminate to check
/// fails the test with a reason instead of exhausting memory.
const MAX_SEARCH_STATES: usize = 2_000_000;

use customer_mapping::proto::{
    BatchGetRequest, BatchGetResult, GetRequest, LinkRequest, MappingKey, PrepareLinkRequest,
    UnlinkRequest, customer_mapping_client::CustomerMappingClient, get_request, mapping_key,
    prepare_link_response, unlink_request,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

/// Users and customers are small integers: `user-{i}` and `cus_{i}` in
/// the platform's account for `i` below [`ACCOUNT_SPAN`], and
/// `user-{i % ACCOUNT_SPAN}` and `cus_{i % ACCOUNT_SPAN}` in the connected
/// account `acct_{i / ACCOUNT_SPAN}` above: the same ids in another
/// account are other keys of the model.
pub type Key = u8;

/// Keys per account.
pub const ACCOUNT_SPAN: Key = 16;
/// Accounts a load spreads its keys over at most.
pub const MAX_ACCOUNTS: Key = 2;

/// A generation: how many times a user was unlinked.
pub type Generation = u16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Link(Key, Key),
    GetByUser(Key),
    GetByCustomer(Key),
    UnlinkByUser(Key),
    UnlinkByCustomer(Key),
    /// Unlink of the user, expecting it linked to this customer.
    UnlinkUserIf(Key, Key),
    /// Unlink of the customer, expecting it linked to this user.
    UnlinkCustomerIf(Key, Key),
    /// BatchGet of `user-0` .. `user-{users - 1}` of each of the first
    /// `accounts` accounts, then `cus_0` .. `cus_{customers - 1}` of each,
    /// at most [`MAX_BATCH`] of each side.
    BatchGet {
        users: Key,
        customers: Key,
        accounts: Key,
    },
    /// PrepareLink of the user.
    Prepare(Key),
    /// Link of the user to the customer after a PrepareLink that found the
    /// user at this generation.
    LinkPrepared(Key, Key, Generation),
}

/// Most users (and customers) one BatchGet of the checker asks for.
pub const MAX_BATCH: usize = 8;

/// No mapping holds the key, in [`Outcome::Batch`].
pub const NONE: Key = Key::MAX;

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
    /// MAPPING_CHANGED: the key is linked otherwise, to this (user, customer).
    Changed(Key, Key),
    /// BatchGet: each user's customer, then each customer's user ([`NONE`]
    /// where unlinked, and past what was asked).
    Batch([Key; MAX_BATCH], [Key; MAX_BATCH]),
    /// PrepareLink of an unlinked user: create at this generation.
    Prepared(Generation),
    /// STALE_PREPARATION: the user is at this generation now.
    Stale(Generation),
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

/// The sequential model: `user_to_customer[u]` is `u`'s customer, if any;
/// `generation[u]` how many times `u` was unlinked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Model {
    user_to_customer: Vec<Option<Key>>,
    generation: Vec<Generation>,
}

/// The keys a BatchGet asks for on one side: the first `n` of each of the
/// first `accounts` accounts.
pub fn batch_keys(n: Key, accounts: Key) -> impl Iterator<Item = Key> {
    (0..accounts).flat_map(move |a| (0..n).map(move |k| a * ACCOUNT_SPAN + k))
}

impl Model {
    /// Room for `users` users in each account.
    pub fn new(users: usize) -> Self {
        let keys = usize::from(ACCOUNT_SPAN) * usize::from(MAX_ACCOUNTS - 1) + users;
        Self {
            user_to_customer: vec![None; keys],
            generation: vec![0; keys],
        }
    }

    /// Stops counting generations. A history with no operation that reads
    /// them gets the same answers from far fewer distinct states: the
    /// search's memory of failed states is keyed by the model.
    fn without_generations(mut self) -> Self {
        self.generation.clear();
        self
    }

    /// Removes `u`'s mapping, which moves it to its next generation.
    fn unlink(&mut self, u: Key) -> Option<Key> {
        let removed = self.user_to_customer[u as usize].take();
        if let (Some(_), Some(generation)) = (removed, self.generation.get_mut(u as usize)) {
            *generation += 1;
        }
        removed
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
            Op::UnlinkByUser(u) => match self.unlink(u) {
                Some(c) => Outcome::Mapping(u, c),
                None => Outcome::NotFound,
            },
            Op::UnlinkByCustomer(c) => match self.user_of(c) {
                Some(u) => {
                    self.unlink(u);
                    Outcome::Mapping(u, c)
                }
                None => Outcome::NotFound,
            },
            Op::UnlinkUserIf(u, c) => match self.user_to_customer[u as usize] {
                Some(held) if held == c => {
                    self.unlink(u);
                    Outcome::Mapping(u, c)
                }
                Some(held) => Outcome::Changed(u, held),
                None => Outcome::NotFound,
            },
            Op::UnlinkCustomerIf(c, u) => match self.user_of(c) {
                Some(held) if held == u => {
                    self.unlink(u);
                    Outcome::Mapping(u, c)
                }
                Some(held) => Outcome::Changed(held, c),
                None => Outcome::NotFound,
            },
            Op::BatchGet {
                users,
                customers,
                accounts,
            } => {
                let (mut of_users, mut of_customers) = ([NONE; MAX_BATCH], [NONE; MAX_BATCH]);
                for (i, u) in batch_keys(users, accounts).enumerate() {
                    of_users[i] = self
                        .user_to_customer
                        .get(u as usize)
                        .copied()
                        .flatten()
                        .unwrap_or(NONE);
                }
                for (i, c) in batch_keys(customers, accounts).enumerate() {
                    of_customers[i] = self.user_of(c).unwrap_or(NONE);
                }
                Outcome::Batch(of_users, of_customers)
            }
            Op::Prepare(u) => match self.user_to_customer[u as usize] {
                Some(c) => Outcome::Mapping(u, c),
                None => Outcome::Prepared(self.generation[u as usize]),
            },
            Op::LinkPrepared(u, c, prepared) => match self.generation[u as usize] {
                now if now != prepared => Outcome::Stale(now),
                _ => self.apply(Op::Link(u, c)),
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
///
/// A depth-first search over (answered operations linearized, model state,
/// unanswered operations used). Two reductions keep a fault that leaves
/// dozens of operations unanswered checkable:
/// - Unanswered operations that are the same operation are used earliest
///   invoked first: one could go wherever a later twin could (invoked no
///   later, and neither ever completed, so neither limits the horizon). So
///   only how many of each kind were used matters, not which.
/// - A state that has used, of every kind, at least as many unanswered
///   operations as an explored one with the same answered set and model
///   state has a subset of its futures: that one failed, so this one fails.
///   Answered operations are tried before unanswered ones, so the state
///   that used fewer is usually explored first.
pub fn linearize(
    history: &History,
    initial: Model,
    final_state: Option<&HashSet<(Key, Key)>>,
) -> Option<Model> {
    let reads_generations = history
        .events
        .iter()
        .any(|e| matches!(e.op, Op::Prepare(_) | Op::LinkPrepared(..)));
    let initial = if reads_generations {
        initial
    } else {
        initial.without_generations()
    };
    let mut answered: Vec<Event> = history
        .events
        .iter()
        .filter(|e| e.outcome != Outcome::Unknown)
        .copied()
        .collect();
    answered.sort_by_key(|e| e.invoked);
    // Unanswered writes, by operation, each kind in invocation order. A
    // read whose answer was lost changed nothing: left out.
    let mut kinds: Vec<(Op, Vec<u64>)> = Vec::new();
    let mut unanswered: Vec<Event> = history
        .events
        .iter()
        .filter(|e| {
            e.outcome == Outcome::Unknown
                && !matches!(
                    e.op,
                    Op::GetByUser(_) | Op::GetByCustomer(_) | Op::BatchGet { .. } | Op::Prepare(_)
                )
        })
        .copied()
        .collect();
    unanswered.sort_by_key(|e| e.invoked);
    for event in &unanswered {
        match kinds.iter_mut().find(|(op, _)| *op == event.op) {
            Some((_, invoked)) => invoked.push(event.invoked),
            None => kinds.push((event.op, vec![event.invoked])),
        }
    }
    let n = answered.len();
    let words = n.div_ceil(64).max(1);
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;

    struct State {
        done: Vec<u64>,
        done_count: usize,
        used: Vec<u16>,
        model: Model,
    }
    let mut stack = vec![State {
        done: vec![0; words],
        done_count: 0,
        used: vec![0; kinds.len()],
        model: initial,
    }];
    // Explored (and so failed) states: for each answered set and model
    // state, the vectors of unanswered operations used.
    let mut explored: HashMap<(Vec<u64>, Model), Vec<Vec<u16>>> = HashMap::new();
    let mut states = 0usize;
    while let Some(State {
        done,
        done_count,
        used,
        model,
    }) = stack.pop()
    {
        if done_count == n && final_state.is_none_or(|pairs| model.pairs() == *pairs) {
            return Some(model);
        }
        let seen = explored.entry((done.clone(), model.clone())).or_default();
        if seen
            .iter()
            .any(|fewer| fewer.iter().zip(&used).all(|(f, u)| f <= u))
        {
            continue;
        }
        seen.push(used.clone());
        states += 1;
        assert!(
            states < MAX_SEARCH_STATES,
            "the checker gave up after {MAX_SEARCH_STATES} states ({} unknown operations): \
             the scenario produces too many indeterminate operations to check",
            unanswered.len()
        );
        // An operation may go next iff no pending answered operation
        // completed before it was invoked.
        let horizon = answered
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_done(&done, *i))
            .map(|(_, e)| e.completed)
            .min()
            .unwrap_or(u64::MAX);
        // Pushed first, so popped last: unanswered operations are tried
        // only when answered ones can't explain the history without them.
        for (k, (op, invoked)) in kinds.iter().enumerate() {
            let next_use = usize::from(used[k]);
            if next_use == invoked.len() || invoked[next_use] > horizon {
                continue;
            }
            let mut next = model.clone();
            next.apply(*op);
            if next == model {
                // Happening now would change nothing: leave it pending, it
                // may still take effect later (or never).
                continue;
            }
            let mut next_used = used.clone();
            next_used[k] += 1;
            stack.push(State {
                done: done.clone(),
                done_count,
                used: next_used,
                model: next,
            });
        }
        for (i, event) in answered.iter().enumerate() {
            if event.invoked > horizon {
                break; // sorted by invocation
            }
            if is_done(&done, i) {
                continue;
            }
            let mut next = model.clone();
            if next.apply(event.op) != event.outcome {
                continue;
            }
            let mut next_done = done.clone();
            next_done[i / 64] |= 1 << (i % 64);
            stack.push(State {
                done: next_done,
                done_count: done_count + 1,
                used: used.clone(),
                model: next,
            });
        }
    }
    None
}

/// How a load of random operations is run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub operations_per_client: usize,
    /// Users and customers in each account.
    pub users: usize,
    pub customers: usize,
    /// Accounts the keys are spread over, at most [`MAX_ACCOUNTS`].
    pub accounts: usize,
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
            accounts: usize::from(MAX_ACCOUNTS),
            deadline: Duration::from_secs(5),
            seed,
            pause_after_unknown: PAUSE_AFTER_UNKNOWN,
        }
    }
}

/// Steers a load running in the background: set `stop` to end it early;
/// `answered` counts the calls that got an answer so far, so that a fault
/// scenario can wait for progress instead of for time.
#[derive(Debug, Clone, Default)]
pub struct Control {
    pub stop: Arc<AtomicBool>,
    pub answered: Arc<AtomicUsize>,
}

impl Control {
    /// Waits until `more` calls have been answered since the call began
    /// (bounded: a load that stops making progress fails the test).
    pub async fn answered_more(&self, more: usize) {
        let wanted = self.answered.load(Ordering::Relaxed) + more;
        let progressed = async {
            while self.answered.load(Ordering::Relaxed) < wanted {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), progressed)
            .await
            .unwrap_or_else(|_| panic!("the load did not answer {more} more calls within 60 s"));
    }
}

/// Runs `load` with clients spread over `addrs` (one HTTP/2 connection each)
/// and returns what they saw. Each client stops early once `control.stop`
/// is set.
/// After an unknown outcome a client pauses briefly and then only reads
/// until it gets an answer again: during an outage that keeps the number of
/// "may or may not have happened" writes, which the checker must try every
/// way, at one per client per outage however long the outage or slow the
/// machine (a read left unanswered changed nothing and is not checked).
pub async fn run_load(
    addrs: &[SocketAddr],
    load: Load,
    started: Instant,
    control: Option<Control>,
) -> History {
    let clients = (0..load.clients).map(|i| {
        let addr = addrs[i % addrs.len()];
        let control = control.clone();
        tokio::spawn(async move {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("a URI")
                .connect_lazy();
            let mut client = CustomerMappingClient::new(channel);
            let mut rng = StdRng::seed_from_u64(load.seed.wrapping_add(i as u64));
            let mut history = History::default();
            let mut only_reads = false;
            // A PrepareLink's user and generation: the next call links it.
            let mut prepared: Option<(Key, Generation)> = None;
            for _ in 0..load.operations_per_client {
                if control
                    .as_ref()
                    .is_some_and(|c| c.stop.load(Ordering::Relaxed))
                {
                    break;
                }
                let account = rng.random_range(0..load.accounts) as Key * ACCOUNT_SPAN;
                let u = account + rng.random_range(0..load.users) as Key;
                let c = account + rng.random_range(0..load.customers) as Key;
                let op = match rng.random_range(0..14) {
                    _ if only_reads && rng.random_bool(0.5) => Op::GetByUser(u),
                    _ if only_reads => Op::GetByCustomer(c),
                    // get-or-create: the customer made with the preparation
                    // is one of the user's account's.
                    _ if prepared.is_some() => {
                        let (u, generation) = prepared.take().unwrap_or_default();
                        let c = c % ACCOUNT_SPAN + u / ACCOUNT_SPAN * ACCOUNT_SPAN;
                        Op::LinkPrepared(u, c, generation)
                    }
                    0..=3 => Op::Link(u, c),
                    4 => Op::GetByUser(u),
                    5 => Op::GetByCustomer(c),
                    6..=7 => Op::UnlinkByUser(u),
                    8..=9 => Op::UnlinkByCustomer(c),
                    10 => Op::UnlinkUserIf(u, c),
                    11 => Op::UnlinkCustomerIf(c, u),
                    12 => Op::Prepare(u),
                    // Every key of the load at one instant: a read that saw
                    // half of a change shows as a state no order explains.
                    _ => Op::BatchGet {
                        users: (load.users * load.accounts).min(MAX_BATCH) as Key
                            / load.accounts as Key,
                        customers: (load.customers * load.accounts).min(MAX_BATCH) as Key
                            / load.accounts as Key,
                        accounts: load.accounts as Key,
                    },
                };
                let deadline = rng.random_range(load.deadline / 8..=load.deadline);
                let invoked = started.elapsed().as_nanos() as u64;
                let outcome = call(&mut client, op, deadline).await;
                only_reads = outcome == Outcome::Unknown;
                if let (Op::Prepare(u), Outcome::Prepared(generation)) = (op, outcome) {
                    prepared = Some((u, generation));
                }
                let completed = if outcome == Outcome::Unknown {
                    tokio::time::sleep(load.pause_after_unknown).await;
                    u64::MAX
                } else {
                    if let Some(control) = &control {
                        control.answered.fetch_add(1, Ordering::Relaxed);
                    }
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
    format!("user-{}", k % ACCOUNT_SPAN)
}
fn customer(k: Key) -> String {
    format!("cus_{}", k % ACCOUNT_SPAN)
}
/// The Stripe account of `k`.
fn account(k: Key) -> String {
    match k / ACCOUNT_SPAN {
        0 => String::new(),
        n => format!("acct_{n}"),
    }
}
fn parse_account(s: &str) -> Key {
    if s.is_empty() {
        return 0;
    }
    s.strip_prefix("acct_")
        .and_then(|n| n.parse::<Key>().ok())
        .map(|n| n * ACCOUNT_SPAN)
        .unwrap_or_else(|| panic!("unexpected account {s:?}"))
}
fn parse_user(s: &str, account: &str) -> Key {
    s.strip_prefix("user-")
        .and_then(|k| k.parse::<Key>().ok())
        .map(|k| k + parse_account(account))
        .unwrap_or_else(|| panic!("unexpected user {s:?}"))
}
fn parse_customer(s: &str, account: &str) -> Key {
    s.strip_prefix("cus_")
        .and_then(|k| k.parse::<Key>().ok())
        .map(|k| k + parse_account(account))
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
            parse_user(&m.user_id, &m.stripe_account),
            parse_customer(&m.stripe_customer_id, &m.stripe_account),
        )
    };
    let result = match op {
        Op::Link(u, c) | Op::LinkPrepared(u, c, _) => client
            .link(with_deadline(
                LinkRequest {
                    user_id: user(u),
                    stripe_customer_id: customer(c),
                    stripe_account: account(u),
                    prepared_generation: match op {
                        Op::LinkPrepared(_, _, generation) => Some(i64::from(generation)),
                        _ => None,
                    },
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
                    stripe_account: account(u),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::GetByCustomer(c) => client
            .get(with_deadline(
                GetRequest {
                    key: Some(get_request::Key::StripeCustomerId(customer(c))),
                    stripe_account: account(c),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkByUser(u) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::UserId(user(u))),
                    stripe_account: account(u),
                    ..Default::default()
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkByCustomer(c) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::StripeCustomerId(customer(c))),
                    stripe_account: account(c),
                    ..Default::default()
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkUserIf(u, c) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::UserId(user(u))),
                    expected_counterpart: customer(c),
                    stripe_account: account(u),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::UnlinkCustomerIf(c, u) => client
            .unlink(with_deadline(
                UnlinkRequest {
                    key: Some(unlink_request::Key::StripeCustomerId(customer(c))),
                    expected_counterpart: user(u),
                    stripe_account: account(c),
                },
                deadline,
            ))
            .await
            .map(|r| mapping(r.into_inner().mapping)),
        Op::BatchGet {
            users,
            customers,
            accounts,
        } => {
            let key = |k: Key, side: mapping_key::Key| MappingKey {
                key: Some(side),
                stripe_account: account(k),
            };
            let keys = batch_keys(users, accounts)
                .map(|u| key(u, mapping_key::Key::UserId(user(u))))
                .chain(
                    batch_keys(customers, accounts)
                        .map(|c| key(c, mapping_key::Key::StripeCustomerId(customer(c)))),
                )
                .collect();
            client
                .batch_get(with_deadline(BatchGetRequest { keys }, deadline))
                .await
                .map(|r| batch_outcome(r.into_inner().results, users, customers, accounts))
        }
        Op::Prepare(u) => client
            .prepare_link(with_deadline(
                PrepareLinkRequest {
                    user_id: user(u),
                    stripe_account: account(u),
                },
                deadline,
            ))
            .await
            .map(|r| match r.into_inner().outcome {
                Some(prepare_link_response::Outcome::Mapping(m)) => mapping(Some(m)),
                Some(prepare_link_response::Outcome::Creation(creation)) => Outcome::Prepared(
                    Generation::try_from(creation.generation).expect("a small generation"),
                ),
                None => panic!("PrepareLink answered nothing"),
            }),
    };
    result.unwrap_or_else(|status| error_outcome(&status))
}

/// The results of [`Op::BatchGet`], checked to answer the keys asked.
fn batch_outcome(
    results: Vec<BatchGetResult>,
    users: Key,
    customers: Key,
    accounts: Key,
) -> Outcome {
    let (mut of_users, mut of_customers) = ([NONE; MAX_BATCH], [NONE; MAX_BATCH]);
    let asked_users: Vec<Key> = batch_keys(users, accounts).collect();
    let asked_customers: Vec<Key> = batch_keys(customers, accounts).collect();
    for (i, result) in results.into_iter().enumerate() {
        let Some(m) = result.mapping else { continue };
        let (u, c) = (
            parse_user(&m.user_id, &m.stripe_account),
            parse_customer(&m.stripe_customer_id, &m.stripe_account),
        );
        if i < asked_users.len() {
            assert_eq!(u, asked_users[i], "BatchGet answered another user's key");
            of_users[i] = c;
        } else {
            let asked = i - asked_users.len();
            assert_eq!(
                c, asked_customers[asked],
                "BatchGet answered another customer's key"
            );
            of_customers[asked] = u;
        }
    }
    Outcome::Batch(of_users, of_customers)
}

/// The account an ErrorInfo names: absent for the platform's own.
fn account_of(metadata: &std::collections::HashMap<String, String>) -> &str {
    metadata.get("stripeAccount").map_or("", String::as_str)
}

fn error_outcome(status: &Status) -> Outcome {
    match status.code() {
        Code::AlreadyExists => {
            let info = status.get_details_error_info().expect("ErrorInfo");
            match info.reason.as_str() {
                "USER_ALREADY_LINKED" => Outcome::UserTaken(parse_customer(
                    &info.metadata["stripeCustomerId"],
                    account_of(&info.metadata),
                )),
                "CUSTOMER_ALREADY_LINKED" => Outcome::CustomerTaken(parse_user(
                    &info.metadata["userId"],
                    account_of(&info.metadata),
                )),
                other => panic!("unexpected reason {other}"),
            }
        }
        Code::NotFound => Outcome::NotFound,
        Code::FailedPrecondition => {
            let info = status.get_details_error_info().expect("ErrorInfo");
            let metadata = &info.metadata;
            match info.reason.as_str() {
                "MAPPING_CHANGED" => Outcome::Changed(
                    parse_user(&metadata["userId"], account_of(metadata)),
                    parse_customer(&metadata["stripeCustomerId"], account_of(metadata)),
                ),
                "STALE_PREPARATION" => {
                    Outcome::Stale(metadata["generation"].parse().expect("a generation"))
                }
                other => panic!("unexpected reason {other}: {status:?}"),
            }
        }
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unknown => Outcome::Unknown,
        _ => panic!("an answer no fault excuses: {status:?}"),
    }
}

/// The table as `(user, customer)` keys, from `(user, customer, account)`
/// rows.
pub fn table_pairs(rows: Vec<(String, String, String)>) -> HashSet<(Key, Key)> {
    rows.into_iter()
        .map(|(u, c, a)| (parse_user(&u, &a), parse_customer(&c, &a)))
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

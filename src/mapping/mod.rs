//! The domain: validated ids, the mapping, the Link / Get / Unlink rules,
//! the bulk reads (BatchGet, List) and the audit trail (ListEvents).
//! Knows nothing of gRPC.

mod actor;
mod audit;
mod batch;
mod error;
mod ids;
mod list;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::time::Instant;

pub use actor::Actor;
pub use audit::{Event, EventKind, EventsPage};
pub use batch::MAX_BATCH_KEYS;
pub use error::{BoxError, Error, FieldViolation};
pub use ids::{InvalidId, MAX_ID_CHARS, StripeCustomerId, UserId};
pub use list::{DEFAULT_PAGE_SIZE, ListCursor, ListPage, MAX_PAGE_SIZE};

use crate::store::{self, Database, LinkAttempt, Sharing, Store, entity::Model};

/// How long database work may go on after its caller's deadline. Work in
/// flight when the caller leaves (a COMMIT on its way, say) usually ends
/// within a round trip; letting it finish keeps its connection reusable
/// instead of closing it, which under short deadlines would churn
/// connections. Short, because on a silent database this is how long a
/// pool slot stays taken after the caller gave up.
const COMPLETION_GRACE: Duration = Duration::from_millis(500);

/// The bound for work with no call deadline in scope: the server's default
/// deadline (`DEFAULT_DEADLINE`) is 10 s.
const NO_DEADLINE_BOUND: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// The instant by which the current call must be answered.
    static CALL_DEADLINE: Instant;
}

/// Runs `call` knowing that it must be answered by `deadline`: its database
/// work is bounded by it (plus [`COMPLETION_GRACE`]).
pub async fn with_deadline<F: Future>(deadline: Instant, call: F) -> F::Output {
    CALL_DEADLINE.scope(deadline, call).await
}

/// When the database work of the current call must be done by.
fn work_until() -> Instant {
    let deadline = CALL_DEADLINE
        .try_with(|deadline| *deadline)
        .unwrap_or_else(|_| Instant::now() + NO_DEADLINE_BOUND);
    deadline + COMPLETION_GRACE
}

/// How many times Link runs its statement again when the row it conflicted
/// with was committed after the statement's snapshot (or unlinked), when the
/// database aborted it, or when its connection was lost. Each needs a
/// concurrent change of the same keys, or a fault, inside a few
/// milliseconds, so a handful is plenty.
const MAX_LINK_ATTEMPTS: usize = 5;

/// One user linked to one Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub user_id: UserId,
    pub stripe_customer_id: StripeCustomerId,
    pub created_at: DateTime<Utc>,
}

/// The outcome of a successful Link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub mapping: Mapping,
    /// True when this call created the mapping, false when it already existed.
    pub created: bool,
}

/// Either side of a mapping, to find or remove it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    User(UserId),
    Customer(StripeCustomerId),
}

/// Link, Get and Unlink over one database.
#[derive(Debug, Clone)]
pub struct Mappings {
    store: Store,
}

impl Mappings {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// The pool, or UNAVAILABLE while the service is still waiting for its
    /// database at start-up.
    fn db(&self) -> Result<&Database, Error> {
        self.store
            .get()
            .ok_or_else(|| Error::Unavailable("the database is not connected yet".into()))
    }

    /// Links `user_id` to `stripe_customer_id`, or says who holds either.
    /// See `src/store/link.rs` for why this has no race window.
    /// A link that creates the mapping records a `Linked` event by `actor`.
    pub async fn link(
        &self,
        user_id: UserId,
        stripe_customer_id: StripeCustomerId,
        actor: Actor,
    ) -> Result<Linked, Error> {
        let (db, until) = (self.db()?.clone(), work_until());
        run_to_completion(
            async move { link(&db, user_id, stripe_customer_id, &actor, until).await },
        )
        .await
    }

    /// The mapping holding `key`.
    pub async fn get(&self, key: &Key) -> Result<Mapping, Error> {
        let (db, key, until) = (self.db()?.clone(), key.clone(), work_until());
        run_to_completion(async move {
            let row = match &key {
                Key::User(id) => store::find_by_user_id(&db, id.as_str(), until).await?,
                Key::Customer(id) => {
                    store::find_by_stripe_customer_id(&db, id.as_str(), until).await?
                }
            };
            row.ok_or(Error::NotFound(key))?.try_into()
        })
        .await
    }

    /// Removes the mapping holding `key` and returns it, recording an
    /// `Unlinked` event by `actor`.
    pub async fn unlink(&self, key: &Key, actor: Actor) -> Result<Mapping, Error> {
        let (db, key, until) = (self.db()?.clone(), key.clone(), work_until());
        run_to_completion(async move {
            let now = Utc::now().trunc_subsecs(6);
            let by = actor.as_store();
            let row = match &key {
                Key::User(id) => store::delete_by_user_id(&db, id.as_str(), now, by, until).await?,
                Key::Customer(id) => {
                    store::delete_by_stripe_customer_id(&db, id.as_str(), now, by, until).await?
                }
            };
            row.ok_or(Error::NotFound(key))?.try_into()
        })
        .await
    }
}

/// Runs database work in its own task so that it always finishes, even when
/// the caller goes away (deadline, cancellation, disconnect) and drops the
/// RPC's future. Dropping database futures half-way leaves connections with
/// half-read replies and transactions whose fate depends on cleanup code in
/// the driver; under a slow database with short deadlines that showed up as
/// an acknowledged Unlink whose row came back (`tests/api/faults.rs`). The
/// work
/// is bounded all the same (see [`work_until`]): every database step it
/// takes ends by the call's deadline plus [`COMPLETION_GRACE`], and a
/// connection cut off by that bound is closed, never reused.
async fn run_to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(work)
        .await
        .map_err(|join| Error::Internal(Box::new(join)))?
}

async fn link(
    db: &Database,
    user_id: UserId,
    stripe_customer_id: StripeCustomerId,
    actor: &Actor,
    until: Instant,
) -> Result<Linked, Error> {
    // PostgreSQL keeps microseconds; truncating here makes the reply of
    // the creating call equal to every later read.
    let now = Utc::now().trunc_subsecs(6);
    // This call's mark on the row it inserts: an attempt that finds the
    // pair already linked with this token is looking at this call's own
    // earlier attempt, whose answer was lost (see `store::link`).
    let token = link_token();
    for attempt in 0..MAX_LINK_ATTEMPTS {
        // A first attempt may share its statement (`store/coalesce/`); one
        // run again goes alone.
        let sharing = if attempt == 0 {
            Sharing::MayShare
        } else {
            Sharing::Alone
        };
        let rows = match store::try_link(
            db,
            user_id.as_str(),
            stripe_customer_id.as_str(),
            now,
            token,
            actor.as_store(),
            sharing,
            until,
        )
        .await?
        {
            LinkAttempt::Created(row) => {
                return Ok(Linked {
                    mapping: row.try_into()?,
                    created: true,
                });
            }
            LinkAttempt::Holders(rows) => rows,
            LinkAttempt::Again => continue,
        };
        // A row holding our user decides first: that is the question a
        // caller linking a user asks ("who is my customer?").
        if let Some(row) = rows.iter().find(|r| r.user_id == user_id.as_str()) {
            let ours = row.link_token == Some(token);
            let existing: Mapping = row.clone().try_into()?;
            return if existing.stripe_customer_id == stripe_customer_id {
                Ok(Linked {
                    mapping: existing,
                    created: ours,
                })
            } else {
                Err(Error::UserAlreadyLinked(existing))
            };
        }
        if let Some(row) = rows.into_iter().next() {
            return Err(Error::CustomerAlreadyLinked(row.try_into()?));
        }
        // The insert conflicted with a row the statement's snapshot could
        // not see (committed after it began), or the holder was unlinked:
        // no answer is justified yet, so try again with a fresh snapshot.
    }
    Err(Error::Contended)
}

/// A random token for one Link call. 64 random bits: two calls drawing the
/// same token for the same pair, one of them retrying, is not a concern.
fn link_token() -> i64 {
    let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
    high as i64
}

impl TryFrom<Model> for Mapping {
    type Error = Error;

    /// Rows are written only from validated ids, so a row that does not parse
    /// means the table was edited by hand: an internal error, not the caller's.
    fn try_from(row: Model) -> Result<Self, Error> {
        let corrupt = |e: InvalidId| {
            Error::Internal(format!("stored mapping {} is invalid: {e}", row.id).into())
        };
        Ok(Mapping {
            user_id: UserId::parse(row.user_id.clone()).map_err(corrupt)?,
            stripe_customer_id: StripeCustomerId::parse(row.stripe_customer_id.clone())
                .map_err(corrupt)?,
            created_at: row.created_at,
        })
    }
}

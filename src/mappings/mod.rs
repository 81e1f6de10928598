//! What each RPC does: Link, Get, Unlink, BatchGet, List and ListEvents
//! over the store, by the call's deadline, with the domain's rules; and
//! Watch's feed (`watch.rs`).

mod reads;
mod watch;

pub use watch::{Changes, Delivery, Feed, MAX_EVENTS_PER_RESPONSE, Start};

use std::time::Duration;

use chrono::{SubsecRound, Utc};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    mapping::{
        Actor, Error, IdempotencyNamespace, Key, LinkArgs, LinkOutcome, LinkToken, LinkWrite,
        Linked, Mapping, Preparation, PrepareOutcome, Prepared, StripeAccount, Unlink, UserId,
    },
    store::{Database, Store},
};

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

/// How many times Link runs its attempt again while no answer is justified
/// (the mapping it conflicted with was committed after its snapshot, or
/// unlinked; the database aborted it; its connection was lost). Each needs
/// a concurrent change of the same keys, or a fault, inside a few
/// milliseconds, so a handful is plenty.
const MAX_LINK_ATTEMPTS: usize = 5;

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

/// The mappings, over one database.
#[derive(Debug, Clone)]
pub struct Mappings {
    store: Store,
    /// Told of every change committed through this replica.
    changes: Changes,
    /// PrepareLink's namespace when configured; otherwise the database's
    /// deployment id.
    namespace: Option<IdempotencyNamespace>,
}

impl Mappings {
    pub fn new(store: Store, changes: Changes, namespace: Option<IdempotencyNamespace>) -> Self {
        Self {
            store,
            changes,
            namespace,
        }
    }

    /// The database, or UNAVAILABLE while the service is still waiting for
    /// it at start-up.
    fn db(&self) -> Result<Database, Error> {
        self.store
            .get()
            .cloned()
            .ok_or_else(|| Error::Unavailable("the database is not connected yet".into()))
    }

    /// Links the user to the customer in the account, or says who holds
    /// either there. A Link that creates the mapping records a `Linked`
    /// event by `actor`.
    pub async fn link(&self, args: LinkArgs, actor: Actor) -> Result<Linked, Error> {
        // PostgreSQL keeps microseconds; truncating here makes the reply of
        // the creating call equal to every later read.
        let created_at = Utc::now().trunc_subsecs(6);
        let write = LinkWrite {
            mapping: Mapping {
                user_id: args.user_id,
                stripe_customer_id: args.stripe_customer_id,
                stripe_account: args.stripe_account,
                created_at,
            },
            token: LinkToken::random(),
            time: created_at,
            actor,
            prepared: args.prepared,
        };
        let (db, until) = (self.db()?, work_until());
        let linked = run_to_completion(async move {
            accounts_enabled(&db, &write.mapping.stripe_account, until).await?;
            link(&db, write, until).await
        })
        .await?;
        if linked.created {
            self.changes.committed();
        }
        Ok(linked)
    }

    /// The mapping holding `key`.
    pub async fn get(&self, key: &Key) -> Result<Mapping, Error> {
        let (db, key, until) = (self.db()?, key.clone(), work_until());
        run_to_completion(async move {
            let found = db.get(&key, until).await?;
            found.ok_or(Error::NotFound(key))
        })
        .await
    }

    /// The user's mapping in `account`, or how to create its customer
    /// there.
    pub async fn prepare_link(
        &self,
        account: StripeAccount,
        user: UserId,
    ) -> Result<PrepareOutcome, Error> {
        let (db, until) = (self.db()?, work_until());
        let configured = self.namespace.clone();
        run_to_completion(async move {
            accounts_enabled(&db, &account, until).await?;
            let key = Key::user(account.clone(), user.clone());
            let generation = match db.prepare(&key, until).await? {
                Prepared::Linked(mapping) => return Ok(PrepareOutcome::Linked(mapping)),
                Prepared::Unlinked(generation) => generation,
            };
            let namespace = match configured {
                Some(namespace) => namespace,
                None => IdempotencyNamespace::new(db.deployment(until).await?),
            };
            Ok(PrepareOutcome::Create(Preparation::new(
                &namespace, &account, &user, generation,
            )))
        })
        .await
    }

    /// Removes the mapping `unlink` names and returns it, recording an
    /// `Unlinked` event by `actor`.
    pub async fn unlink(&self, unlink: &Unlink, actor: Actor) -> Result<Mapping, Error> {
        let (db, unlink, until) = (self.db()?, unlink.clone(), work_until());
        let mapping = run_to_completion(async move {
            let now = Utc::now().trunc_subsecs(6);
            let found = db.unlink(&unlink, now, &actor, until).await?;
            found.answer(&unlink)
        })
        .await?;
        self.changes.committed();
        Ok(mapping)
    }
}

/// Attempts `write` until an attempt justifies an answer. A first attempt
/// may share its statement; one run again goes alone.
async fn link(db: &Database, write: LinkWrite, until: Instant) -> Result<Linked, Error> {
    for attempt in 0..MAX_LINK_ATTEMPTS {
        let found = if attempt == 0 {
            db.link(write.clone(), until).await?
        } else {
            db.link_again(write.clone(), until).await?
        };
        let (mapping, created) = match found.outcome(&write) {
            LinkOutcome::Created(mapping) => (mapping, true),
            LinkOutcome::Present(mapping) => (mapping, false),
            LinkOutcome::UserConflict(holder) => return Err(Error::UserAlreadyLinked(holder)),
            LinkOutcome::Stale(current) => {
                let mapping = write.mapping;
                return Err(Error::StalePreparation {
                    user: mapping.user_id,
                    account: mapping.stripe_account,
                    prepared: write.prepared.unwrap_or(current),
                    current,
                });
            }
            LinkOutcome::CustomerConflict(holder) => {
                return Err(Error::CustomerAlreadyLinked(holder));
            }
            LinkOutcome::Undecided => continue,
        };
        return Ok(Linked { mapping, created });
    }
    Err(Error::Contended)
}

/// Refuses a connected account until the database has accounts enabled
/// (`migration::accounts`): only the writes that would create mappings
/// of one ask, since no mapping of another account can exist before.
async fn accounts_enabled(
    db: &Database,
    account: &StripeAccount,
    until: Instant,
) -> Result<(), Error> {
    if account.is_platform() || db.accounts_enabled(until).await? {
        Ok(())
    } else {
        Err(Error::AccountsNotEnabled)
    }
}

/// Runs database work in its own task so that it always finishes, even when
/// the caller goes away (deadline, cancellation, disconnect) and drops the
/// RPC's future. Dropping database futures half-way leaves connections with
/// half-read replies and transactions whose fate depends on cleanup code in
/// the driver; under a slow database with short deadlines that showed up as
/// an acknowledged Unlink whose row came back (`tests/api/faults.rs`). The
/// work is bounded all the same (see [`work_until`]): every database step it
/// takes ends by the call's deadline plus [`COMPLETION_GRACE`], and a
/// connection cut off by that bound is closed, never reused.
async fn run_to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    // In the call's span, so that its statements' spans are the call's.
    tokio::spawn(work.in_current_span())
        .await
        .map_err(|join| Error::Internal(Box::new(join)))?
}

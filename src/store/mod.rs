//! Persistence, and the one owner of the database: opening, migrating,
//! pinging and closing it, every read and write, and the classification of
//! its errors. [`Database`] is the one place that knows which database it
//! talks to: PostgreSQL (`postgres/`) or SQLite (`sqlite.rs`). Speaks the
//! domain's language (keys, mappings, Link attempts); knows nothing of
//! gRPC.

pub mod entity;
mod errors;
pub mod event_entity;
mod feed;
mod postgres;
mod queries;
mod rows;
mod sqlite;

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{DbErr, EntityTrait, FromQueryResult, Select};
use tokio::time::Instant;
use tracing::Instrument;

pub use feed::{FeedPage, FeedPosition};

use crate::{
    config::DatabaseSettings,
    mapping::{
        Actor, Event, Generation, Key, LinkAttempt, LinkWrite, ListCursor, MAX_BATCH_KEYS, Mapping,
        Prepared, StripeAccount, Unlink, Unlinked,
    },
    telemetry::{metrics::PoolStats, traces},
};

/// How long applying the migrations may take. They are a few DDL
/// statements on a small schema; this only bounds a database that went
/// silent half-way, after which the start-up loop tries again.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The database once it is open, shared by the RPCs and the health probe.
/// Empty while the service starts against a database that does not answer
/// yet.
#[derive(Debug, Clone, Default)]
pub struct Store(Arc<OnceLock<Database>>);

impl Store {
    /// The database, or `None` while it is not open.
    pub fn get(&self) -> Option<&Database> {
        self.0.get()
    }

    /// Publishes the database; only the first call has an effect.
    pub fn set(&self, db: Database) {
        let _ = self.0.set(db);
    }
}

/// Whether opening the database applies the pending migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    Apply,
    Leave,
}

/// Why the database could not be opened or did not answer: the kind of
/// failure in a few words (a supervisor logs when it changes, not at every
/// probe) and what happened, naming the database without its password.
#[derive(Debug)]
pub struct Failure {
    pub kind: &'static str,
    what: String,
    error: Option<DbErr>,
}

impl Failure {
    fn new(what: impl Into<String>, error: DbErr) -> Self {
        Self {
            kind: errors::failure_kind(&error),
            what: what.into(),
            error: Some(error),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(error) => write!(f, "{}: {}", self.what, errors::describe(error)),
            None => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for Failure {}

/// An open database.
#[derive(Debug, Clone)]
pub struct Database(Arc<Opened>);

#[derive(Debug)]
struct Opened {
    backend: Backend,
    /// The deployment's id, once read.
    deployment: OnceLock<String>,
    /// Whether the database is known to have Stripe accounts enabled
    /// (`migration::accounts`); once they are, they stay.
    accounts_enabled: AtomicBool,
}

#[derive(Debug)]
enum Backend {
    Postgres(postgres::Db),
    Sqlite(sqlite::Db),
}

impl Database {
    /// Opens the database `settings` name: connects (refusing a standby on
    /// PostgreSQL) and applies the pending migrations when asked. `serve`,
    /// `migrate` and `import` all open it here. Every step is bounded: this
    /// fails rather than hangs on a database that does not answer.
    /// Processes migrating one PostgreSQL database together take turns
    /// (`postgres/migration_lock.rs`): one applies, the others then find
    /// nothing pending. SQLite has one writer at a time anyway.
    pub async fn open(
        settings: &DatabaseSettings,
        migrations: Migrations,
    ) -> Result<Self, Failure> {
        let url = settings.database_url.expose_secret();
        let migrate = migrations == Migrations::Apply;
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            postgres::Db::open(url, settings, migrate)
                .await
                .map(Backend::Postgres)
        } else {
            sqlite::Db::open(url, settings, migrate)
                .await
                .map(Backend::Sqlite)
        };
        let backend = backend
            .map_err(|err| Failure::new(format!("opening {}", settings.redacted_url()), err))?;
        Ok(Self(Arc::new(Opened {
            backend,
            deployment: OnceLock::new(),
            accounts_enabled: AtomicBool::new(false),
        })))
    }

    /// Proves within `timeout` that the database answers and, on
    /// PostgreSQL, that it is a primary. A failed ping also stops the reuse
    /// of the connections open now: they may sit on a path that went
    /// silent, and each would cost a caller its deadline.
    pub async fn ping(&self, timeout: Duration) -> Result<(), Failure> {
        let until = Instant::now() + timeout;
        let pinged = match &self.0.backend {
            Backend::Postgres(db) => db.ping(until).await,
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.conn.ping())
                .await
                .map_err(|_| errors::timed_out("the health ping"))
                .and_then(|pinged| pinged),
        };
        pinged.map_err(|err| {
            self.forget_connections();
            Failure::new("pinging the database", err)
        })
    }

    /// Whether the service's tables are there, up to date, by `timeout`:
    /// `false` for a database with none of them yet, an error for one with
    /// someone else's `stripe_customers` or only some of the migrations. A
    /// dry-run import reads a database without migrating it.
    pub async fn schema_is_ready(&self, timeout: Duration) -> Result<bool, DbErr> {
        let ready = async {
            match &self.0.backend {
                Backend::Postgres(db) => db.schema_is_ready(timeout).await,
                Backend::Sqlite(db) => migration::ready(&db.conn).await,
            }
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| errors::timed_out("reading the schema"))?
    }

    /// Proves within `timeout` that the schema is at least the one this
    /// release needs (a newer one, written by the next release's
    /// migrations, serves as well): until then every call would fail.
    pub async fn check_schema(&self, timeout: Duration) -> Result<(), Failure> {
        let until = Instant::now() + timeout;
        let applied = match &self.0.backend {
            Backend::Postgres(db) => db.applied_migrations(until).await,
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.applied_migrations())
                .await
                .map_err(|_| errors::timed_out("reading the schema"))
                .and_then(|applied| applied),
        }
        .map_err(|err| Failure::new("reading the schema", err))?;
        let missing: Vec<String> = migration::names()
            .into_iter()
            .filter(|name| !applied.contains(name))
            .collect();
        match missing.as_slice() {
            [] => Ok(()),
            [first, ..] => Err(Failure {
                kind: "schema older than this release",
                what: format!(
                    "the database lacks {} migration(s) this release needs, from {first} on: \
                     run `customer-mapping migrate` (or serve with MIGRATE_ON_START=true)",
                    missing.len()
                ),
                error: None,
            }),
        }
    }

    /// Stops reusing the connections open now (PostgreSQL; SQLite runs
    /// in-process and cannot go silent).
    fn forget_connections(&self) {
        if let Backend::Postgres(db) = &self.0.backend {
            db.forget_connections();
        }
    }

    /// Open and idle connections.
    pub fn stats(&self) -> PoolStats {
        let (open, idle) = match &self.0.backend {
            Backend::Postgres(db) => db.stats(),
            Backend::Sqlite(db) => db.stats(),
        };
        PoolStats { open, idle }
    }

    /// Closes the connections, giving up at `timeout`. Connections still in
    /// use close when their work ends (bounded by its own deadline).
    pub async fn close(&self, timeout: Duration) -> Result<(), Failure> {
        let until = Instant::now() + timeout;
        match &self.0.backend {
            Backend::Postgres(db) => {
                db.close(until).await;
                Ok(())
            }
            Backend::Sqlite(db) => tokio::time::timeout_at(until, db.conn.close_by_ref())
                .await
                .map_err(|_| errors::timed_out("closing the database"))
                .flatten()
                .map_err(|err| Failure::new("closing the database", err)),
        }
    }

    /// The mapping holding `key`. Concurrent Gets on PostgreSQL share
    /// statements (`postgres/lane.rs`).
    pub async fn get(&self, key: &Key, until: Instant) -> Result<Option<Mapping>, DbErr> {
        let row = match &self.0.backend {
            Backend::Postgres(db) => db.get(key, until).await?,
            Backend::Sqlite(db) => db.get(key).instrument(sqlite_span("get")).await?,
        };
        row.as_ref().map(rows::mapping).transpose()
    }

    /// One attempt at a Link. On PostgreSQL it shares its statement with
    /// the Links queued with it when the server is busy, unless it follows
    /// a PrepareLink: then it goes alone, in a transaction of its own
    /// (`postgres/link.rs`).
    pub async fn link(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        if let Some(prepared) = write.prepared {
            return self.link_prepared(&write, prepared, until).await;
        }
        match &self.0.backend {
            Backend::Postgres(db) => db.link(write, until).await,
            Backend::Sqlite(db) => match db.link(&[&write]).instrument(sqlite_span("link")).await {
                Ok(attempts) => Ok(rows::only(attempts)),
                Err(err) => errors::attempt_after(err, until),
            },
        }
    }

    /// One attempt at a Link run again after an undecided one: alone, so
    /// that Links whose shared statement was aborted (a deadlock with
    /// another statement holding several rows) cannot meet in one again.
    pub async fn link_again(&self, write: LinkWrite, until: Instant) -> Result<LinkAttempt, DbErr> {
        match &self.0.backend {
            Backend::Postgres(_) if write.prepared.is_some() => self.link(write, until).await,
            Backend::Postgres(db) => db.link_alone(write, until).await,
            Backend::Sqlite(_) => self.link(write, until).await,
        }
    }

    async fn link_prepared(
        &self,
        write: &LinkWrite,
        prepared: Generation,
        until: Instant,
    ) -> Result<LinkAttempt, DbErr> {
        let span = traces::statement_span("link_prepared", self.system());
        match &self.0.backend {
            Backend::Postgres(db) => {
                db.link_prepared(write, prepared, until)
                    .instrument(span)
                    .await
            }
            Backend::Sqlite(db) => match db.link_prepared(write, prepared).instrument(span).await {
                Ok(attempt) => Ok(attempt),
                Err(err) => errors::attempt_after(err, until),
            },
        }
    }

    /// What a PrepareLink of `key` (a user's, in its account) finds: the
    /// mapping, or else the user's generation, both at one instant. On
    /// PostgreSQL it shares its statement like a Get.
    pub async fn prepare(&self, key: &Key, until: Instant) -> Result<Prepared, DbErr> {
        let found = match &self.0.backend {
            Backend::Postgres(db) => db.prepare(key, until).await?,
            Backend::Sqlite(db) => {
                db.prepare(key)
                    .instrument(sqlite_span("prepare_link"))
                    .await?
            }
        };
        rows::prepared(found)
    }

    /// Whether mappings of connected accounts may be written: on
    /// PostgreSQL, once the upgrade's last step has run
    /// (`migration::accounts`). Asked again until it has.
    pub async fn accounts_enabled(&self, until: Instant) -> Result<bool, DbErr> {
        if self.0.accounts_enabled.load(Ordering::Acquire) {
            return Ok(true);
        }
        let enabled = match &self.0.backend {
            Backend::Postgres(db) => db.accounts_enabled(until).await?,
            Backend::Sqlite(_) => true,
        };
        if enabled {
            self.0.accounts_enabled.store(true, Ordering::Release);
        }
        Ok(enabled)
    }

    /// Runs the upgrade's last step (`migration::accounts`), by `timeout`.
    pub async fn enable_accounts(&self, timeout: Duration) -> Result<(), Failure> {
        let until = Instant::now() + timeout;
        match &self.0.backend {
            Backend::Postgres(db) => db
                .enable_accounts(until)
                .await
                .map_err(|err| Failure::new("enabling Stripe accounts", err)),
            Backend::Sqlite(_) => Ok(()),
        }
    }

    /// One attempt at Links that share no key (an import's batch), in one
    /// statement on PostgreSQL, one transaction on SQLite: each Link's
    /// attempt, in order. All are `Again` when running it again is safe.
    pub async fn link_batch(
        &self,
        writes: &[&LinkWrite],
        until: Instant,
    ) -> Result<Vec<LinkAttempt>, DbErr> {
        match &self.0.backend {
            Backend::Postgres(db) => db.link_batch(writes, until).await,
            Backend::Sqlite(db) => db
                .link(writes)
                .await
                .or_else(|err| errors::attempts_after(err, writes.len(), until)),
        }
    }

    /// What [`Database::link_batch`] would find, writing nothing (a dry
    /// run): the mappings holding each Link's user or customer. Read at
    /// most BatchGet's number of keys at a time: with ten times as many ids
    /// in its `IN` lists, PostgreSQL's planner reads the whole table
    /// instead of the indexes. A dry run writes nothing, so its chunks need
    /// not be read at one instant.
    pub async fn link_batch_holders(
        &self,
        writes: &[&LinkWrite],
        until: Instant,
    ) -> Result<Vec<LinkAttempt>, DbErr> {
        let mut attempts = Vec::with_capacity(writes.len());
        for chunk in writes.chunks(MAX_BATCH_KEYS / 2) {
            let keys: Vec<Key> = chunk.iter().flat_map(|w| w.keys()).collect();
            let holders = self
                .all("holding_any", queries::holding_any(&keys), until)
                .await?;
            attempts.extend(rows::attempts(chunk, Vec::new(), &holders)?);
        }
        Ok(attempts)
    }

    /// Removes the mapping `unlink` names and records its event,
    /// atomically; what it found.
    pub async fn unlink(
        &self,
        unlink: &Unlink,
        time: DateTime<Utc>,
        actor: &Actor,
        until: Instant,
    ) -> Result<Unlinked, DbErr> {
        let span = traces::statement_span("unlink", self.system());
        match &self.0.backend {
            Backend::Postgres(db) => db.unlink(unlink, time, actor, until).instrument(span).await,
            Backend::Sqlite(db) => db.unlink(unlink, time, actor).instrument(span).await,
        }
    }

    /// The mappings holding any of `keys`, all as they were at one instant.
    pub async fn holding_any(&self, keys: &[Key], until: Instant) -> Result<Vec<Mapping>, DbErr> {
        let rows = self
            .all("holding_any", queries::holding_any(keys), until)
            .await?;
        rows.iter().map(rows::mapping).collect()
    }

    /// Up to `limit` mappings after `after`, oldest first, each with its
    /// place in the order; only those of `account` when given.
    pub async fn list(
        &self,
        account: Option<&StripeAccount>,
        after: Option<ListCursor>,
        limit: u64,
        until: Instant,
    ) -> Result<Vec<(Mapping, ListCursor)>, DbErr> {
        let rows = self
            .all("list", queries::list_page(account, after, limit), until)
            .await?;
        rows.iter()
            .map(|row| Ok((rows::mapping(row)?, rows::list_cursor(row))))
            .collect()
    }

    /// Up to `limit` events after sequence `after`, in sequence order; only
    /// those about `key` when given.
    pub async fn events(
        &self,
        key: Option<&Key>,
        after: Option<i64>,
        limit: u64,
        until: Instant,
    ) -> Result<Vec<Event>, DbErr> {
        let rows = self
            .all("events", queries::events_page(key, after, limit), until)
            .await?;
        rows.into_iter().map(rows::event).collect()
    }

    /// The id of the deployment this database belongs to, created with it
    /// (on first use, so that replicas of the previous release keep
    /// serving alongside). Watch's cursors carry it: a cursor made by
    /// another deployment's database is refused rather than misread.
    pub async fn deployment(&self, until: Instant) -> Result<&str, DbErr> {
        if let Some(id) = self.0.deployment.get() {
            return Ok(id);
        }
        let proposed = uuid::Uuid::new_v4().simple().to_string();
        let id = match &self.0.backend {
            Backend::Postgres(db) => db.deployment(&proposed, until).await?,
            Backend::Sqlite(db) => db.deployment(&proposed).await?,
        };
        Ok(self.0.deployment.get_or_init(|| id))
    }

    /// The position before every event: Watch from the beginning.
    pub fn feed_beginning(&self) -> FeedPosition {
        match &self.0.backend {
            Backend::Postgres(_) => FeedPosition::Snapshot(postgres::feed::Position::beginning()),
            Backend::Sqlite(_) => FeedPosition::Sequence(0),
        }
    }

    /// The present, as a feed position: every event committed now is
    /// before it, every later one after it.
    pub async fn feed_present(&self, until: Instant) -> Result<FeedPosition, DbErr> {
        match &self.0.backend {
            Backend::Postgres(db) => db.feed_present(until).await.map(FeedPosition::Snapshot),
            Backend::Sqlite(db) => db.last_sequence().await.map(FeedPosition::Sequence),
        }
    }

    /// Up to `limit` events of the feed after `from`, in feed order,
    /// reading on to `up_to` (to the present when `None`). An `up_to` that
    /// `from` is not within is ignored: positions only move forward.
    pub async fn feed(
        &self,
        from: &FeedPosition,
        up_to: Option<&FeedPosition>,
        limit: u64,
        until: Instant,
    ) -> Result<FeedPage, DbErr> {
        let up_to = up_to.filter(|wanted| from.is_within(wanted));
        let (rows, position, reached) = match (&self.0.backend, from) {
            (Backend::Postgres(db), FeedPosition::Snapshot(from)) => {
                let up_to = match up_to {
                    Some(FeedPosition::Snapshot(wanted)) => Some(wanted),
                    _ => None,
                };
                let (rows, position, reached) = db.feed(from, up_to, limit, until).await?;
                (rows, FeedPosition::Snapshot(position), reached)
            }
            (Backend::Sqlite(db), FeedPosition::Sequence(after)) => {
                let up_to = match up_to {
                    Some(FeedPosition::Sequence(wanted)) => Some(*wanted),
                    _ => None,
                };
                let rows = db.feed(*after, up_to, limit).await?;
                let last = rows.last().map_or(*after, |row| row.sequence);
                let reached = (rows.len() as u64) < limit || up_to == Some(last);
                let position = match up_to {
                    Some(wanted) if reached => wanted,
                    _ => last,
                };
                (rows, FeedPosition::Sequence(position), reached)
            }
            _ => return Err(DbErr::Custom("a feed position of another database".into())),
        };
        let events = rows
            .into_iter()
            .map(rows::event)
            .collect::<Result<_, _>>()?;
        Ok(FeedPage {
            events,
            position,
            reached,
        })
    }

    /// Every row that `select` finds, in one statement, by `until`;
    /// `operation` names the statement's span.
    async fn all<E>(
        &self,
        operation: &'static str,
        select: Select<E>,
        until: Instant,
    ) -> Result<Vec<E::Model>, DbErr>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        let span = traces::statement_span(operation, self.system());
        match &self.0.backend {
            Backend::Postgres(db) => db.all(select, until).instrument(span).await,
            Backend::Sqlite(db) => select.all(&db.conn).instrument(span).await,
        }
    }

    /// The database's name in statement spans (OpenTelemetry's
    /// `db.system.name`).
    fn system(&self) -> &'static str {
        match &self.0.backend {
            Backend::Postgres(_) => "postgresql",
            Backend::Sqlite(_) => "sqlite",
        }
    }
}

/// A SQLite statement's span (PostgreSQL's Gets and Links get theirs in
/// `postgres/lane.rs`, where statements are shared).
fn sqlite_span(operation: &'static str) -> tracing::Span {
    traces::statement_span(operation, "sqlite")
}

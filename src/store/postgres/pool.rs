//! The PostgreSQL connections, held by the service itself rather than by
//! sqlx's pool.
//!
//! Why not sqlx's pool: when a `PoolConnection` is dropped, sqlx spawns
//! `return_to_pool`, which always pings the connection with no timeout
//! (sqlx-core 0.9 `pool/connection.rs`). On a peer that went silent that
//! ping never ends and holds a pool permit forever; after `max_connections`
//! such connections the pool has no permits left and never opens a new
//! connection, so the service stays down long after the database is back.
//! Nothing in sqlx's options can skip or bound that ping.
//!
//! Here every interaction has a bound, and a connection is only ever
//! reused when its last exchange finished cleanly: a connection that timed
//! out, failed, or was left inside a transaction is closed (bounded) and
//! its slot is given back at once, so the next caller opens a fresh one.
//! There is no ping on acquire or release: a reused connection was in a
//! known state when it was put back, and a connection that broke while idle
//! fails its next statement, which is retried (Link) or reported UNAVAILABLE.

use std::{
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use sea_orm::{
    DbErr, RuntimeErr, Statement,
    sqlx::{
        self, ConnectOptions, Connection, PgConnection,
        postgres::{PgConnectOptions, PgRow},
    },
};
use sea_query_sqlx::SqlxValues;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::store::errors::{is_read_only, standby, timed_out};

/// A backend left idle inside a transaction is ended by PostgreSQL after
/// this long. Our transactions never pause between statements longer than a
/// round trip, so only a transaction whose client vanished behind a silent
/// path ever reaches it. Without it, such a session keeps its uncommitted
/// row and the locks on both keys until the server's own TCP keepalive
/// gives up (hours by default), and every later Link of those keys waits
/// on them: recovery within seconds of a silence needs this to be well
/// under the 10 s the service promises.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "5s";

/// How long closing one discarded connection may take. Closing sends one
/// Terminate message into the socket's buffer and shuts it down; it only
/// waits when that buffer is full, which on a silent path can be forever.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pool limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(in crate::store) struct Limits {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
}

/// The service's PostgreSQL connections.
#[derive(Debug, Clone)]
pub(super) struct Pool(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    options: PgConnectOptions,
    limits: Limits,
    /// One permit per connection that may be open: held by every connection
    /// checked out, idle connections hold none (they are counted by `idle`).
    slots: Arc<Semaphore>,
    /// Idle connections, newest last (reused first: warmest caches).
    idle: Mutex<Vec<Idle>>,
    /// Bumped when the database stopped answering or a connection landed on
    /// a standby: connections opened before are not trusted any more and
    /// are closed instead of reused.
    generation: AtomicU64,
    open: AtomicU32,
    closed: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    conn: PgConnection,
    generation: u64,
}

/// A connection in use. Dropping it without [`Checkout::release`] closes
/// the connection: its state is unknown.
pub(super) struct Checkout {
    conn: Option<PgConnection>,
    generation: u64,
    pool: Arc<Inner>,
    _slot: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(url: &str, limits: Limits) -> Result<Self, DbErr> {
        let options = PgConnectOptions::from_str(url)
            .map_err(sqlx_err)?
            // Statement logging would put SQL and values in the log.
            .disable_statement_logging()
            .options([(
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            )]);
        Ok(Self(Arc::new(Inner {
            options,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            idle: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            open: AtomicU32::new(0),
            closed: AtomicBool::new(false),
        })))
    }

    /// A connection, idle or new, by `until` at the latest.
    ///
    /// Waiting for a free slot is bounded by the acquire timeout (how long a
    /// caller may queue behind others) and by `until` (the call's own
    /// deadline). Opening a connection is bounded by the connect timeout
    /// and by `until`: on a silent path the TCP handshake succeeds and the
    /// start-up message is never answered.
    pub async fn acquire(&self, until: Instant) -> Result<Checkout, DbErr> {
        let inner = &self.0;
        if inner.closed.load(Ordering::Acquire) {
            return Err(DbErr::ConnectionAcquire(
                sea_orm::ConnAcquireErr::ConnectionClosed,
            ));
        }
        let queue_until = until.min(Instant::now() + inner.limits.acquire_timeout);
        let slot =
            match tokio::time::timeout_at(queue_until, inner.slots.clone().acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_closed)) => {
                    return Err(DbErr::ConnectionAcquire(
                        sea_orm::ConnAcquireErr::ConnectionClosed,
                    ));
                }
                Err(_) => return Err(DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout)),
            };
        let current = inner.generation.load(Ordering::Acquire);
        loop {
            let idle = inner.lock_idle().pop();
            match idle {
                Some(idle) if idle.generation == current => {
                    return Ok(Checkout {
                        conn: Some(idle.conn),
                        generation: idle.generation,
                        pool: inner.clone(),
                        _slot: slot,
                    });
                }
                Some(stale) => inner.discard(stale.conn),
                None => break,
            }
        }
        let connect_until = until.min(Instant::now() + inner.limits.connect_timeout);
        let conn = match tokio::time::timeout_at(connect_until, self.connect()).await {
            Ok(conn) => conn?,
            Err(_) => return Err(timed_out("connecting to the database")),
        };
        Ok(Checkout {
            conn: Some(conn),
            generation: current,
            pool: inner.clone(),
            _slot: slot,
        })
    }

    /// Opens a connection and refuses it if it reached a standby: writes
    /// there fail, and after a failover the address may briefly still lead
    /// to the old primary, now demoted, or to a replica.
    async fn connect(&self) -> Result<PgConnection, DbErr> {
        let mut conn = PgConnection::connect_with(&self.0.options)
            .await
            .map_err(sqlx_err)?;
        self.0.open.fetch_add(1, Ordering::AcqRel);
        let in_recovery: Result<(bool,), _> = sqlx::query_as("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await;
        match in_recovery {
            Ok((false,)) => Ok(conn),
            Ok((true,)) => {
                self.0.discard(conn);
                self.forget_connections();
                Err(standby())
            }
            Err(err) => {
                self.0.discard(conn);
                Err(sqlx_err(err))
            }
        }
    }

    /// Closes every idle connection and marks those in use to be closed on
    /// release. Called when the database stopped answering: connections
    /// opened before may sit on a path that went silent, and reusing one
    /// would cost a caller its whole deadline.
    pub fn forget_connections(&self) {
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        let stale = std::mem::take(&mut *self.0.lock_idle());
        for idle in stale {
            self.0.discard(idle.conn);
        }
    }

    /// Changes whenever the pool stops trusting its connections: the lanes
    /// stop counting the statements in flight on them.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// What every connection is opened with (the migrator's pool uses it).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.0.options
    }

    /// Open and idle connections.
    pub fn stats(&self) -> (u32, u32) {
        let idle = self.0.lock_idle().len();
        (
            self.0.open.load(Ordering::Acquire),
            u32::try_from(idle).unwrap_or(u32::MAX),
        )
    }

    /// Closes the idle connections, each bounded, and makes every other
    /// connection close on release. Returns when done or at `until`.
    pub async fn close(&self, until: Instant) {
        self.0.closed.store(true, Ordering::Release);
        self.0.slots.close();
        let idle = std::mem::take(&mut *self.0.lock_idle());
        let closing = async {
            for idle in idle {
                self.0.open.fetch_sub(1, Ordering::AcqRel);
                let _ = idle.conn.close().await;
            }
        };
        let _ = tokio::time::timeout_at(until, closing).await;
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic while holding this lock can't leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes a connection in the background, bounded, so that the server
    /// learns at once (when the path works) that the session is gone.
    fn discard(&self, conn: PgConnection) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        // Outside a runtime (a checkout dropped as the process exits) the
        // connection is simply dropped, which closes its socket.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
            });
        }
    }
}

impl Checkout {
    fn conn(&mut self) -> Result<&mut PgConnection, DbErr> {
        self.conn
            .as_mut()
            .ok_or_else(|| DbErr::Conn(RuntimeErr::Internal("connection already closed".into())))
    }

    /// Runs `work` on the connection by `until`. On any error or timeout
    /// the connection is closed: a statement that failed or was cut off may
    /// have left replies unread or a transaction open.
    pub(super) async fn bounded<T>(
        &mut self,
        until: Instant,
        what: &'static str,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, DbErr> {
        let conn = self.conn()?;
        let result = match tokio::time::timeout_at(until, work(conn)).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(err)) => sqlx_err(err),
            Err(_) => timed_out(what),
        };
        if let Some(conn) = self.conn.take() {
            self.pool.discard(conn);
        }
        if is_read_only(&result) {
            // This session is on a standby: so, probably, are the others.
            self.pool.generation.fetch_add(1, Ordering::AcqRel);
        }
        Err(result)
    }

    pub async fn fetch_optional(
        &mut self,
        stmt: &Statement,
        until: Instant,
    ) -> Result<Option<PgRow>, DbErr> {
        self.bounded(until, "a database query", async |conn| {
            query(stmt).fetch_optional(conn).await
        })
        .await
    }

    pub async fn fetch_all(
        &mut self,
        stmt: &Statement,
        until: Instant,
    ) -> Result<Vec<PgRow>, DbErr> {
        self.bounded(until, "a database query", async |conn| {
            query(stmt).fetch_all(conn).await
        })
        .await
    }

    /// Puts the connection back for reuse. Only call this when its last
    /// exchange finished and no transaction is open.
    pub fn release(mut self) {
        let Some(conn) = self.conn.take() else { return };
        let pool = &self.pool;
        if pool.closed.load(Ordering::Acquire)
            || pool.generation.load(Ordering::Acquire) != self.generation
        {
            pool.discard(conn);
            return;
        }
        // Pushed before the slot is given back (when `self` drops), so a
        // caller woken by the slot finds this connection.
        pool.lock_idle().push(Idle {
            conn,
            generation: self.generation,
        });
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.discard(conn);
        }
    }
}

/// A statement built by SeaORM, bound for sqlx.
fn query(stmt: &Statement) -> sqlx::query::Query<'_, sqlx::Postgres, SqlxValues> {
    let values = stmt.values.clone().unwrap_or(sea_orm::Values(Vec::new()));
    sqlx::query_with(sqlx::AssertSqlSafe(stmt.sql.as_str()), SqlxValues(values))
}

pub(super) fn sqlx_err(err: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(err)))
}

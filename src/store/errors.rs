//! Sorting database errors into what a caller can act on. The domain turns
//! these answers into its own errors (`mapping::Error`); the store only says
//! what happened.

use sea_orm::{DbErr, RuntimeErr, sqlx};
use tokio::time::Instant;

use crate::mapping::{Error, LinkAttempt};

impl From<DbErr> for Error {
    /// The store says what kind of failure it was; the domain's error says
    /// what the caller may do about it.
    fn from(err: DbErr) -> Self {
        let failure = Box::new(DatabaseFailure(describe(&err)));
        if is_unavailable(&err) {
            Error::Unavailable(failure)
        } else {
            Error::Internal(failure)
        }
    }
}

/// A database error for a log line, as [`describe`] words it. It has no
/// source: its text is already the one cause.
#[derive(Debug)]
struct DatabaseFailure(String);

impl std::fmt::Display for DatabaseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DatabaseFailure {}

/// A database error in one cause: the database's own message with its
/// SQLSTATE, or the driver's. SeaORM's and sqlx's wrappers each repeat
/// the cause (an error chain prints it three times), and sqlx appends the
/// line of PostgreSQL's C source that raised it, which tells an operator
/// nothing.
pub fn describe(err: &DbErr) -> String {
    match sqlx_error(err) {
        Some(sqlx::Error::Database(db)) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        Some(other) => other.to_string(),
        None => err.to_string(),
    }
}

/// What a failed Link statement means for an attempt that may go on until
/// `until`: run it again when nothing can be written twice by doing so
/// ([`is_worth_repeating`]) and there is time left.
pub(super) fn attempt_after(err: DbErr, until: Instant) -> Result<LinkAttempt, DbErr> {
    if is_worth_repeating(&err) && Instant::now() < until {
        tracing::debug!(error = describe(&err), "link attempt failed; repeating");
        Ok(LinkAttempt::Again)
    } else {
        Err(err)
    }
}

/// [`attempt_after`] for each of `n` Links that shared the failed
/// statement.
pub(super) fn attempts_after(
    err: DbErr,
    n: usize,
    until: Instant,
) -> Result<Vec<LinkAttempt>, DbErr> {
    attempt_after(err, until)?;
    Ok((0..n).map(|_| LinkAttempt::Again).collect())
}

/// The database wrote nothing (it aborted the statement, or it is a
/// standby), or the connection was lost (an attempt carrying the same
/// token finds out whether it was written): running it again is safe. A
/// connection that failed has been closed, never reused. Failing to get a
/// connection is not repeated: the pool has its own bounds, and a
/// database that cannot be reached is UNAVAILABLE.
pub(super) fn is_worth_repeating(err: &DbErr) -> bool {
    is_rolled_back_by_database(err) || is_connection_lost(err) || is_read_only(err)
}

/// Prefix of the errors the store makes itself when a bound expires.
const TIMED_OUT: &str = "timed out: ";

/// The error for an interaction with the database that did not finish
/// within its bound. Its connection has been closed.
pub(super) fn timed_out(what: &'static str) -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(format!("{TIMED_OUT}{what}")))
}

/// The message of the error for a session that reached a standby.
const STANDBY: &str = "the database address leads to a standby (pg_is_in_recovery)";

/// The error for a connection that reached a standby, refused.
pub(super) fn standby() -> DbErr {
    DbErr::Conn(RuntimeErr::Internal(STANDBY.into()))
}

/// What kind of failure this is, in a few words for a log line: the health
/// supervisor logs when the kind changes, not at every probe.
pub(super) fn failure_kind(err: &DbErr) -> &'static str {
    if is_timeout(err) {
        "no answer in time"
    } else if is_read_only(err)
        || matches!(err, DbErr::Conn(RuntimeErr::Internal(msg)) if msg == STANDBY)
    {
        "reached a standby"
    } else if is_connection_lost(err) {
        "connection lost"
    } else if is_unavailable(err) {
        "unavailable"
    } else {
        "error"
    }
}

/// A bound expired: the database did not answer in time (or the path to it
/// is silent). What the interaction did, if anything, is unknown.
pub(super) fn is_timeout(err: &DbErr) -> bool {
    matches!(err, DbErr::Conn(RuntimeErr::Internal(msg)) if msg.starts_with(TIMED_OUT))
        || matches!(
            err,
            DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout)
        )
}

/// The database aborted the transaction to resolve contention (PostgreSQL
/// serialization failure or deadlock): it was rolled back whole, so running
/// it again cannot apply anything twice.
pub(super) fn is_rolled_back_by_database(err: &DbErr) -> bool {
    pg_code(err).is_some_and(|code| code == "40001" || code == "40P01")
}

/// The connection broke (reset, or ended by the server) in the middle of a
/// transaction. Before COMMIT was sent this is safe to retry on another
/// connection: the server rolls back a transaction whose session died.
pub(super) fn is_connection_lost(err: &DbErr) -> bool {
    match sqlx_error(err) {
        Some(sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => true,
        Some(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| {
                let code = pg.code();
                code.starts_with("08") || code.starts_with("57P")
            }),
        _ => false,
    }
}

/// The session is on a standby (SQLSTATE 25006, read-only transaction):
/// nothing was written, and a connection to the primary may succeed.
pub(super) fn is_read_only(err: &DbErr) -> bool {
    pg_code(err).is_some_and(|code| code == "25006")
}

/// Errors that say "the database is not answering right now", as opposed to
/// "this request or this code is wrong".
pub(super) fn is_unavailable(err: &DbErr) -> bool {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        _ => match sqlx_error(err) {
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed,
            ) => true,
            Some(sqlx::Error::Database(db)) => {
                let code = db.code().unwrap_or_default();
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    pg_code_is_unavailable(&code)
                } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    sqlite_code_is_busy(&code)
                } else {
                    false
                }
            }
            _ => false,
        },
    }
}

fn sqlx_error(err: &DbErr) -> Option<&sqlx::Error> {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e))
        | DbErr::Conn(RuntimeErr::SqlxError(e)) => Some(e.as_ref()),
        _ => None,
    }
}

fn pg_code(err: &DbErr) -> Option<String> {
    match sqlx_error(err) {
        Some(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .map(|pg| pg.code().to_owned()),
        _ => None,
    }
}

/// SQLSTATE classes and codes that mean the server or the connection is
/// going away or overloaded, the transaction was aborted for contention, or
/// the session reached a standby.
fn pg_code_is_unavailable(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, ...)
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
        || code == "55P03" // lock not available
        || code == "25006" // read-only transaction: a standby, after a failover
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes: another
/// writer held the lock for longer than the busy timeout.
fn sqlite_code_is_busy(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stores_own_errors_are_unavailable_and_say_their_kind() {
        let timeout = timed_out("a database query");
        assert!(is_timeout(&timeout) && is_unavailable(&timeout));
        assert!(!is_connection_lost(&timeout), "a timeout is not a retry");
        assert_eq!(failure_kind(&timeout), "no answer in time");

        let standby = standby();
        assert!(is_unavailable(&standby) && !is_timeout(&standby));
        assert_eq!(failure_kind(&standby), "reached a standby");

        let acquire = DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        assert!(is_timeout(&acquire) && is_unavailable(&acquire));
    }

    #[test]
    fn a_read_only_transaction_is_unavailable() {
        assert!(pg_code_is_unavailable("25006"));
        assert!(
            !pg_code_is_unavailable("23505"),
            "a unique violation is a bug"
        );
    }
}

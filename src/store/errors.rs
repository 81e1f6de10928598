//! Sorting database errors into what a caller can act on.

use sea_orm::{DbErr, RuntimeErr, sqlx};

use crate::mapping::Error;

impl From<DbErr> for Error {
    fn from(err: DbErr) -> Self {
        if is_unavailable(&err) {
            Error::Unavailable(Box::new(err))
        } else {
            Error::Internal(Box::new(err))
        }
    }
}

/// The database aborted the transaction to resolve contention (PostgreSQL
/// serialization failure or deadlock): it was rolled back whole, so running
/// it again cannot apply anything twice.
pub fn is_rolled_back_by_database(err: &DbErr) -> bool {
    pg_code(err).is_some_and(|code| code == "40001" || code == "40P01")
}

/// The connection broke (reset, or ended by the server) in the middle of a
/// transaction. Before COMMIT was sent this is safe to retry on another
/// connection: the server rolls back a transaction whose session died.
pub fn is_connection_lost(err: &DbErr) -> bool {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some_and(|pg| {
                        let code = pg.code();
                        code.starts_with("08") || code.starts_with("57P")
                    }),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Errors that say "the database is not answering right now", as opposed to
/// "this request or this code is wrong".
fn is_unavailable(err: &DbErr) -> bool {
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::BeginFailed => true,
                sqlx::Error::Database(db) => {
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
            }
        }
        _ => false,
    }
}

fn pg_code(err: &DbErr) -> Option<String> {
    match err {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                sqlx::Error::Database(db) => db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .map(|pg| pg.code().to_owned()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// SQLSTATE classes and codes that mean the server or the connection is
/// going away or overloaded, or the transaction was aborted for contention.
fn pg_code_is_unavailable(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, ...)
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
        || code == "55P03" // lock not available
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes: another
/// writer held the lock for longer than the busy timeout.
fn sqlite_code_is_busy(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

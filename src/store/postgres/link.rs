//! The writes: Link ([`LINK_SQL`], for one Link or many) and Unlink
//! (`unlink_sql!`), each one autocommit statement that also records its
//! audit event.
//!
//! # Why Link has no race window
//!
//! `LINK_SQL` takes its Links as arrays (`unnest`), inserts them with `ON
//! CONFLICT DO NOTHING` (no conflict target: either unique index makes it
//! do nothing), and returns the rows it inserted plus, for each Link it did
//! not insert, the rows holding its user or its customer. It is sent alone,
//! in autocommit: one round trip on every path (new, replay, conflict). No
//! two Links of one statement share a user or a customer (`lane.rs`), so
//! each is decided against rows outside the statement, exactly as if alone.
//!
//! 1. The insert is arbitrated by the two unique indexes, not by any read:
//!    if another session holds an uncommitted row with either key, the
//!    insert waits for it to end, then inserts or does nothing because a
//!    *committed* row holds a key. Two Links can never both insert, and an
//!    inserted row is ours: created takes effect at the statement's commit.
//! 2. For a Link the insert skipped, the holders are read from the
//!    statement's snapshot. Under READ COMMITTED the snapshot is taken when
//!    the statement starts, after the call began, and it is one consistent
//!    state: every row holding either key at that instant, and no other.
//!    The domain's decision from them (`mapping::LinkAttempt::outcome`) is
//!    exactly what a Link at that instant would answer, so the snapshot's
//!    instant is the linearization point of a replay or a conflict.
//! 3. The insert checks the indexes against the latest committed rows, not
//!    against the snapshot. So it can conflict with a row committed after
//!    the snapshot was taken (it waited for that transaction), which the
//!    read cannot see: then the Link gets no row at all. Nothing was
//!    written for it and the snapshot said its keys were free, so no answer
//!    is justified yet: the caller runs it again, alone, with a fresh
//!    snapshot. A row unlinked between the snapshot and the insert is
//!    harmless: the insert succeeds and the Link is not pending.
//! 4. Shared statements (`lane.rs`) keep this: a queued call is only
//!    answered by a statement sent after it joined, never by one already in
//!    flight, whose snapshot may predate the call. Calls answered by one
//!    statement share its instant, a legal order for concurrent calls.
//!
//! **`created` after an unknown outcome.** Every attempt of one call writes
//! the call's token into the row it inserts. When the connection is lost
//! after the statement was sent, the call runs it again on another
//! connection; if the first attempt did commit, the retry finds the call's
//! own row, token included, and answers created (the linearization point
//! is the first attempt's commit). What this cannot see: the first attempt
//! committed *and* a concurrent Unlink removed that row before the retry
//! ran; the retry then inserts again and the call reports one creation
//! where the database saw two.
//!
//! **The audit event** is one more data-modifying CTE of the same
//! statement: PostgreSQL runs every data-modifying CTE exactly once, in the
//! same snapshot and transaction, so the event exists if and only if the
//! row was inserted, and Link stays one round trip.
//!
//! **Accounts.** Every key is a side's id *in an account*: the unique
//! indexes are (user, account) and (customer, account), the holders are
//! looked up in the Link's account, and the lane keeps apart Links of one
//! user or one customer in one account.
//!
//! # Why a prepared Link cannot link a stale customer
//!
//! A Link with `prepared_generation` must write nothing once the user has
//! been unlinked since (the generation counts Unlinked events). Checking
//! the count in `LINK_SQL`'s snapshot is not enough: a Link and an Unlink
//! of the user may both commit after the snapshot and before the insert,
//! which then succeeds against a count that is no longer true. So a
//! prepared Link runs in a transaction (`link_prepared`): `LINK_SQL`, then
//! the count in a new snapshot, then COMMIT or ROLLBACK. If the insert
//! succeeded, this transaction holds the (user, account) index entry: every
//! Unlink that removed an earlier mapping of the user had committed before
//! the insert could proceed (the insert waits for a deleting transaction
//! on the same key), its event with it; so the second snapshot counts
//! every Unlink up to the commit, and none can follow before it. If the
//! insert did nothing, the answer is `LINK_SQL`'s findings, which are the
//! state at its snapshot, and the count is at least the count then: a
//! stale count refuses (true at the second snapshot), a current one means
//! the first snapshot's count was current too.

use chrono::{DateTime, Utc};
use sea_orm::{
    DbErr,
    sqlx::{self, Connection, PgConnection, Row, postgres::PgRow},
};
use tokio::time::Instant;

use super::{
    model,
    pool::{Checkout, Pool},
};
use crate::{
    mapping::{Actor, Generation, LinkAttempt, LinkWrite, Side, Unlink, Unlinked},
    store::rows::{self, KIND_LINKED, KIND_UNLINKED},
};

/// Link, for every Link of `$1..$7` (one element per Link). The holders
/// are looked up Link by Link (`LATERAL`), so that each is one probe of a
/// unique index whatever the planner thinks of the table's size.
const LINK_SQL: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[],
                         $5::timestamptz[], $6::text[], $7::text[], $8::text[])
        WITH ORDINALITY
        AS t (user_id, stripe_customer_id, created_at, link_token, time, caller, request_id,
              stripe_account, n)
), ins AS (
    INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at, link_token, stripe_account)
    SELECT user_id, stripe_customer_id, created_at, link_token, stripe_account FROM input ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, user_id, stripe_customer_id, created_at, link_token, stripe_account
), ev AS (
    INSERT INTO mapping_events
        (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id,
         stripe_account)
    SELECT $9::smallint, ins.user_id, ins.stripe_customer_id, ins.created_at,
           input.time, input.caller, input.request_id, ins.stripe_account
    FROM ins JOIN input
      ON input.user_id = ins.user_id AND input.stripe_account = ins.stripe_account
    ORDER BY input.n
), pending AS (
    SELECT user_id, stripe_customer_id, stripe_account FROM input
    WHERE (user_id, stripe_account) NOT IN (SELECT user_id, stripe_account FROM ins)
)
SELECT TRUE AS inserted, id, user_id, stripe_customer_id, created_at, link_token, stripe_account
FROM ins
UNION ALL
SELECT FALSE, s.id, s.user_id, s.stripe_customer_id, s.created_at, s.link_token, s.stripe_account
FROM pending p, LATERAL (SELECT * FROM stripe_customers
                         WHERE user_id = p.user_id AND stripe_account = p.stripe_account) s
UNION ALL
SELECT FALSE, s.id, s.user_id, s.stripe_customer_id, s.created_at, s.link_token, s.stripe_account
FROM pending p, LATERAL (SELECT * FROM stripe_customers
                         WHERE stripe_customer_id = p.stripe_customer_id
                           AND stripe_account = p.stripe_account) s";

/// A user's generation in an account: how many times it was unlinked
/// there. Counted from the trail, which every writer keeps (the previous
/// release included).
pub(super) const GENERATION_SQL: &str = "SELECT count(*) FROM mapping_events \
     WHERE user_id = $1 AND stripe_account = $2 AND kind = $3";

/// The mapping columns an Unlink answers with, named rather than `*`: a
/// prepared statement whose result type changes fails ("cached plan must
/// not change result type"), so a column added by a later release must not
/// change what this release's statements return.
macro_rules! mapping_columns {
    () => {
        "id, user_id, stripe_customer_id, created_at, link_token, stripe_account"
    };
}

/// Unlink of the mapping holding `$1` in `$column` in account `$6` (and,
/// with `$only_pair`, `$7` on the other side), with its event. Each row
/// says whether it was removed.
macro_rules! unlink_sql {
    ($column:literal, $only_pair:expr) => {
        concat!(
            "WITH removed AS (DELETE FROM stripe_customers WHERE ",
            $column,
            " = $1 AND stripe_account = $6",
            $only_pair,
            " RETURNING ",
            mapping_columns!(),
            "), \
             recorded AS (INSERT INTO mapping_events \
               (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id, \
                stripe_account) \
               SELECT $2, user_id, stripe_customer_id, created_at, $3, $4, $5, stripe_account \
               FROM removed) \
             SELECT TRUE AS removed, ",
            mapping_columns!(),
            " FROM removed"
        )
    };
}

/// An Unlink of exactly the pair `$1`, `$7` in account `$6`: removed, or
/// else the mapping holding `$1` there now.
///
/// "Now" is read with a lock (`FOR KEY SHARE`), not from the statement's
/// snapshot: a mapping removed by a concurrent Unlink that committed while
/// this one waited is gone (the lock skips it), so the answer is NOT_FOUND,
/// never MAPPING_CHANGED naming the very pair the caller expected. The
/// read runs only when nothing was removed (a one-time filter), never
/// locking the row this statement deleted.
macro_rules! unlink_pair_sql {
    ($column:literal, $counterpart:literal) => {
        concat!(
            unlink_sql!($column, concat!(" AND ", $counterpart, " = $7")),
            " UNION ALL SELECT FALSE, ",
            mapping_columns!(),
            " FROM (SELECT * FROM stripe_customers WHERE ",
            $column,
            " = $1 AND stripe_account = $6 AND NOT EXISTS (SELECT FROM removed) \
             FOR KEY SHARE) kept"
        )
    };
}

/// [`LINK_SQL`]'s arrays, one element per Link.
struct LinkArrays<'a> {
    users: Vec<&'a str>,
    customers: Vec<&'a str>,
    created_ats: Vec<DateTime<Utc>>,
    tokens: Vec<i64>,
    times: Vec<DateTime<Utc>>,
    callers: Vec<&'a str>,
    request_ids: Vec<&'a str>,
    accounts: Vec<&'a str>,
}

impl<'a> LinkArrays<'a> {
    fn new(writes: &[&'a LinkWrite]) -> Self {
        let column = |f: fn(&'a LinkWrite) -> &'a str| writes.iter().map(|w| f(w)).collect();
        Self {
            users: column(|w| w.mapping.user_id.as_str()),
            customers: column(|w| w.mapping.stripe_customer_id.as_str()),
            created_ats: writes.iter().map(|w| w.mapping.created_at).collect(),
            tokens: writes.iter().map(|w| w.token.stored()).collect(),
            times: writes.iter().map(|w| w.time).collect(),
            callers: column(|w| &w.actor.caller),
            request_ids: column(|w| &w.actor.request_id),
            accounts: column(|w| w.mapping.stripe_account.as_str()),
        }
    }

    async fn run(&self, conn: &mut PgConnection) -> Result<Vec<PgRow>, sqlx::Error> {
        sqlx::query(LINK_SQL)
            .bind(&self.users)
            .bind(&self.customers)
            .bind(&self.created_ats)
            .bind(&self.tokens)
            .bind(&self.times)
            .bind(&self.callers)
            .bind(&self.request_ids)
            .bind(&self.accounts)
            .bind(KIND_LINKED)
            .fetch_all(conn)
            .await
    }
}

/// Runs [`LINK_SQL`] for `writes` (no two sharing a user or a customer),
/// by `until`: each Link's attempt, in order.
pub(super) async fn link(
    mut conn: Checkout,
    writes: &[&LinkWrite],
    what: &'static str,
    until: Instant,
) -> Result<Vec<LinkAttempt>, DbErr> {
    let arrays = LinkArrays::new(writes);
    let fetched = conn
        .bounded(until, what, async |conn| arrays.run(conn).await)
        .await?;
    conn.release();
    attempts(writes, fetched)
}

/// A Link after a PrepareLink at generation `prepared`, in a transaction
/// of its own that commits only while the user is still at it (see "Why a
/// prepared Link cannot link a stale customer" above).
pub(super) async fn link_prepared(
    mut conn: Checkout,
    write: &LinkWrite,
    prepared: Generation,
    until: Instant,
) -> Result<LinkAttempt, DbErr> {
    let arrays = LinkArrays::new(&[write]);
    let mapping = &write.mapping;
    let (fetched, current) = conn
        .bounded(until, "a prepared Link", async |conn| {
            let mut tx = conn.begin().await?;
            let fetched = arrays.run(&mut tx).await?;
            let current: i64 = sqlx::query_scalar(GENERATION_SQL)
                .bind(mapping.user_id.as_str())
                .bind(mapping.stripe_account.as_str())
                .bind(KIND_UNLINKED)
                .fetch_one(&mut *tx)
                .await?;
            if current == prepared.count() {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok((fetched, current))
        })
        .await?;
    conn.release();
    match rows::generation(current)? {
        current if current != prepared => Ok(LinkAttempt::Stale(current)),
        _ => Ok(rows::only(attempts(&[write], fetched)?)),
    }
}

/// Each Link's attempt from [`LINK_SQL`]'s rows.
fn attempts(writes: &[&LinkWrite], fetched: Vec<PgRow>) -> Result<Vec<LinkAttempt>, DbErr> {
    let (mut inserted, mut holders) = (Vec::new(), Vec::new());
    for row in fetched {
        let was_inserted: bool = row.try_get("inserted").map_err(super::pool::sqlx_err)?;
        let row = model(row)?;
        if was_inserted {
            inserted.push(row);
        } else {
            holders.push(row);
        }
    }
    rows::attempts(writes, inserted, &holders)
}

/// Removes the mapping `unlink` names and records its event, in one
/// statement; what it found.
pub(super) async fn unlink(
    pool: &Pool,
    unlink: &Unlink,
    time: DateTime<Utc>,
    actor: &Actor,
    until: Instant,
) -> Result<Unlinked, DbErr> {
    let key = unlink.key();
    let counterpart = unlink.expected_counterpart();
    let sql = match (&key.side, counterpart) {
        (Side::User(_), None) => unlink_sql!("user_id", ""),
        (Side::Customer(_), None) => unlink_sql!("stripe_customer_id", ""),
        (Side::User(_), Some(_)) => unlink_pair_sql!("user_id", "stripe_customer_id"),
        (Side::Customer(_), Some(_)) => unlink_pair_sql!("stripe_customer_id", "user_id"),
    };
    let mut conn = pool.acquire(until).await?;
    let found = conn
        .bounded(until, "a database query", async |conn| {
            let query = sqlx::query(sql)
                .bind(key.side.as_str())
                .bind(KIND_UNLINKED)
                .bind(time)
                .bind(&actor.caller)
                .bind(&actor.request_id)
                .bind(key.account.as_str());
            match counterpart {
                Some(counterpart) => query.bind(counterpart.as_str()),
                None => query,
            }
            .fetch_optional(conn)
            .await
        })
        .await?;
    conn.release();
    let Some(row) = found else {
        return Ok(Unlinked::Absent);
    };
    let removed: bool = row.try_get("removed").map_err(super::pool::sqlx_err)?;
    let mapping = rows::mapping(&model(row)?)?;
    Ok(if removed {
        Unlinked::Removed(mapping)
    } else {
        Unlinked::Kept(mapping)
    })
}

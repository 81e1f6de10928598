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

use chrono::{DateTime, Utc};
use sea_orm::{
    DbErr,
    sqlx::{self, Row},
};
use tokio::time::Instant;

use super::{
    model,
    pool::{Checkout, Pool},
};
use crate::{
    mapping::{Actor, Key, LinkAttempt, LinkWrite, Unlink, Unlinked},
    store::{
        queries,
        rows::{self, KIND_LINKED, KIND_UNLINKED},
    },
};

/// Link, for every Link of `$1..$7` (one element per Link). The holders
/// are looked up Link by Link (`LATERAL`), so that each is one probe of a
/// unique index whatever the planner thinks of the table's size.
const LINK_SQL: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[],
                         $5::timestamptz[], $6::text[], $7::text[])
        WITH ORDINALITY
        AS t (user_id, stripe_customer_id, created_at, link_token, time, caller, request_id, n)
), ins AS (
    INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at, link_token)
    SELECT user_id, stripe_customer_id, created_at, link_token FROM input ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, user_id, stripe_customer_id, created_at, link_token
), ev AS (
    INSERT INTO mapping_events
        (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id)
    SELECT $8::smallint, ins.user_id, ins.stripe_customer_id, ins.created_at,
           input.time, input.caller, input.request_id
    FROM ins JOIN input ON input.user_id = ins.user_id
    ORDER BY input.n
), pending AS (
    SELECT user_id, stripe_customer_id FROM input
    WHERE user_id NOT IN (SELECT user_id FROM ins)
)
SELECT TRUE AS inserted, id, user_id, stripe_customer_id, created_at, link_token FROM ins
UNION ALL
SELECT FALSE, s.id, s.user_id, s.stripe_customer_id, s.created_at, s.link_token
FROM pending p, LATERAL (SELECT * FROM stripe_customers WHERE user_id = p.user_id) s
UNION ALL
SELECT FALSE, s.id, s.user_id, s.stripe_customer_id, s.created_at, s.link_token
FROM pending p,
     LATERAL (SELECT * FROM stripe_customers WHERE stripe_customer_id = p.stripe_customer_id) s";

/// Unlink of the mapping holding `$1` in `$column` (and, with
/// `$only_pair`, `$6` on the other side), with its event. Each row says
/// whether it was removed.
macro_rules! unlink_sql {
    ($column:literal, $only_pair:expr) => {
        concat!(
            "WITH removed AS (DELETE FROM stripe_customers WHERE ",
            $column,
            " = $1",
            $only_pair,
            " RETURNING *), \
             recorded AS (INSERT INTO mapping_events \
               (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id) \
               SELECT $2, user_id, stripe_customer_id, created_at, $3, $4, $5 FROM removed) \
             SELECT TRUE AS removed, * FROM removed"
        )
    };
}

/// An Unlink of exactly the pair `$1`, `$6`: removed, or else the mapping
/// holding `$1` now.
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
            unlink_sql!($column, concat!(" AND ", $counterpart, " = $6")),
            " UNION ALL SELECT FALSE, * FROM (SELECT * FROM stripe_customers WHERE ",
            $column,
            " = $1 AND NOT EXISTS (SELECT FROM removed) FOR KEY SHARE) kept"
        )
    };
}

/// Runs [`LINK_SQL`] for `writes` (no two sharing a user or a customer),
/// by `until`: each Link's attempt, in order.
pub(super) async fn link(
    mut conn: Checkout,
    writes: &[&LinkWrite],
    what: &'static str,
    until: Instant,
) -> Result<Vec<LinkAttempt>, DbErr> {
    let column = |f: fn(&LinkWrite) -> &str| writes.iter().map(|w| f(w)).collect::<Vec<_>>();
    let users = column(|w| w.mapping.user_id.as_str());
    let customers = column(|w| w.mapping.stripe_customer_id.as_str());
    let callers = column(|w| &w.actor.caller);
    let request_ids = column(|w| &w.actor.request_id);
    let created_ats: Vec<DateTime<Utc>> = writes.iter().map(|w| w.mapping.created_at).collect();
    let times: Vec<DateTime<Utc>> = writes.iter().map(|w| w.time).collect();
    let tokens: Vec<i64> = writes.iter().map(|w| w.token.stored()).collect();
    let fetched = conn
        .bounded(until, what, async |conn| {
            sqlx::query(LINK_SQL)
                .bind(&users)
                .bind(&customers)
                .bind(&created_ats)
                .bind(&tokens)
                .bind(&times)
                .bind(&callers)
                .bind(&request_ids)
                .bind(KIND_LINKED)
                .fetch_all(conn)
                .await
        })
        .await?;
    conn.release();
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
    let sql = match (key, counterpart) {
        (Key::User(_), None) => unlink_sql!("user_id", ""),
        (Key::Customer(_), None) => unlink_sql!("stripe_customer_id", ""),
        (Key::User(_), Some(_)) => unlink_pair_sql!("user_id", "stripe_customer_id"),
        (Key::Customer(_), Some(_)) => unlink_pair_sql!("stripe_customer_id", "user_id"),
    };
    let mut conn = pool.acquire(until).await?;
    let found = conn
        .bounded(until, "a database query", async |conn| {
            let query = sqlx::query(sql)
                .bind(queries::value(key))
                .bind(KIND_UNLINKED)
                .bind(time)
                .bind(&actor.caller)
                .bind(&actor.request_id);
            match counterpart {
                Some(counterpart) => query.bind(queries::value(counterpart)),
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

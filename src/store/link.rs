//! Link: one statement on PostgreSQL, for one pair or many; one
//! transaction on SQLite.
//!
//! # The statement (PostgreSQL)
//!
//! [`LINK_SQL`]: the pairs arrive as arrays (`unnest`), so the statement
//! has eight parameters whether it links two pairs or a few hundred
//! (concurrent Links share it: `coalesce/links.rs`; so do the batches of
//! `customer-mapping import`).
//!
//! ```sql
//! WITH input AS (SELECT * FROM unnest($users, $customers, ...)),
//!      ins AS (INSERT INTO stripe_customers ... SELECT ... FROM input
//!              ON CONFLICT DO NOTHING RETURNING ...),
//!      ev AS (INSERT INTO mapping_events ... SELECT ... FROM ins),
//!      pending AS (input rows whose user ins did not insert)
//! SELECT TRUE, ins.* FROM ins
//! UNION ALL
//! SELECT FALSE, rows holding a pending row's user or customer
//! ```
//!
//! A Link that goes alone sends the same statement written out for one
//! pair ([`link_statement`], built with sea-query: `INSERT ... VALUES`, and
//! the holders `WHERE (user_id = $user OR stripe_customer_id = $customer)
//! AND NOT EXISTS (SELECT 1 FROM ins)`), which PostgreSQL runs faster than
//! arrays of one.
//!
//! Either is sent alone, in autocommit: one round trip on every path (new,
//! replay, conflict), no BEGIN, no COMMIT. No two pairs of one statement
//! share a user or a customer (the caller sees to it), so each pair's fate
//! is decided against rows outside the statement, exactly as if it were
//! alone.
//!
//! # Why the answer is linearizable
//!
//! 1. The insert is arbitrated by the two unique indexes, not by any read:
//!    if another session holds an uncommitted row with either key, the
//!    insert waits for it to end, then inserts or does nothing because a
//!    *committed* row holds a key. Two Links can never both insert, and an
//!    inserted row is ours: `Created` takes effect at the statement's commit.
//! 2. For a pair the insert skipped, the second branch returns the rows
//!    that held its user or its customer in the statement's snapshot.
//!    Under READ COMMITTED the snapshot is taken when the statement starts,
//!    after the call began, and it is one consistent state: every row
//!    holding either key at that instant, and no other. The decision the
//!    service takes from them (the user's row decides, then the customer's)
//!    is exactly what a Link at that instant would answer, so the
//!    snapshot's instant is the linearization point of a replay or a
//!    conflict.
//! 3. The insert checks the indexes against the latest committed rows, not
//!    against the snapshot. So it can conflict with a row committed after
//!    the snapshot was taken (it waited for that transaction), which the
//!    second branch cannot see: then the pair gets no row at all. Nothing
//!    was written for it and the snapshot said its keys were free, so no
//!    answer is justified yet: [`LinkAttempt::Holders`] is empty and the
//!    caller runs it again (bounded), alone, with a fresh snapshot. A row
//!    unlinked between the snapshot and the insert is harmless: the insert
//!    succeeds (a deleted row is no conflict) and the pair is not pending.
//!
//! # `created` after an unknown outcome
//!
//! Each Link call draws one random token and every attempt of that call
//! writes it into the row it inserts (`link_token`). When the connection is
//! lost after the statement was sent, the attempt may or may not have
//! committed; the call runs the same statement again on another connection.
//! If the first attempt did commit, the retry conflicts with our own row and
//! the second branch returns it, token included: the token is ours, so the
//! answer is `created = true` (the linearization point is the first
//! attempt's commit). Any other call's token (or none) means `created =
//! false`.
//!
//! What this cannot see: if the first attempt committed *and* a concurrent
//! Unlink removed that row before the retry ran, the retry inserts again
//! and the call reports one creation where the database saw two. That needs
//! a lost connection and an Unlink of the same keys inside one call.
//!
//! # The audit event
//!
//! The `KIND_LINKED` event of a created mapping is one more data-modifying
//! CTE of the same statement, `ev`: PostgreSQL runs every data-modifying
//! CTE exactly once, referenced or not, in the same snapshot and the same
//! autocommit transaction, so the event exists if and only if `ins`
//! inserted, and Link stays one round trip.
//!
//! # SQLite
//!
//! Writers are serialized (the service's writer queue and `BEGIN
//! IMMEDIATE`), so the insert and the read of the holders run in one
//! transaction that sees exactly what the insert conflicted with.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryResult, QueryTrait, Set,
    sea_query::{
        Alias, CommonTableExpression, Expr, ExprTrait, InsertStatement, OnConflict, Query,
        SelectStatement, UnionType, WithClause, WithQuery,
    },
    sqlx::{self, Row, postgres::PgRow},
};
use tokio::time::Instant;

use super::{
    Backend, Database, SqliteDb,
    coalesce::LinkRequest,
    entity::{ActiveModel, Column, Entity as StripeCustomers, Model},
    errors::{is_connection_lost, is_read_only, is_rolled_back_by_database},
    event_entity::{Column as EventColumn, Entity as MappingEvents},
    events::{self, Actor, KIND_LINKED},
    postgres::{Checkout, sqlx_err},
};

/// The columns of a row, in the order both branches return them.
const COLUMNS: [Column; 5] = [
    Column::Id,
    Column::UserId,
    Column::StripeCustomerId,
    Column::CreatedAt,
    Column::LinkToken,
];

/// What one attempt at linking found.
#[derive(Debug)]
pub enum LinkAttempt {
    /// This attempt inserted the row.
    Created(Model),
    /// The insert did nothing; these rows held the user or the customer at
    /// one instant during the attempt (one of them may be this call's own
    /// row, from an earlier attempt: see `link_token`). Empty when the row
    /// it conflicted with was committed after that instant, or unlinked.
    Holders(Vec<Model>),
    /// Run it again: the database aborted it (deadlock, serialization
    /// failure, a standby), so nothing was written; or its connection was
    /// lost, so it may have been, and the next attempt, carrying the same
    /// token, will find out.
    Again,
}

/// Whether an attempt may share its statement with concurrent Links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// A first attempt: on PostgreSQL it shares a statement with the Links
    /// queued with it when the server is busy.
    MayShare,
    /// An attempt run again: alone, so that pairs whose shared statement
    /// was aborted (a deadlock with another statement holding several rows)
    /// cannot meet in one again.
    Alone,
}

/// One attempt to link `user_id` to `stripe_customer_id` for the call
/// holding `token`, done or failed by `until`.
#[allow(clippy::too_many_arguments)]
pub async fn try_link(
    db: &Database,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    token: i64,
    actor: Actor<'_>,
    sharing: Sharing,
    until: Instant,
) -> Result<LinkAttempt, DbErr> {
    let pg = match &db.0 {
        Backend::Postgres(pg) => pg,
        Backend::Sqlite(db) => {
            let insert =
                insert_unless_either_key_taken(user_id, stripe_customer_id, created_at, token);
            return try_link_sqlite(db, &insert, user_id, stripe_customer_id, created_at, actor)
                .await;
        }
    };
    let request = LinkRequest {
        user_id: user_id.to_owned(),
        stripe_customer_id: stripe_customer_id.to_owned(),
        created_at,
        token,
        caller: actor.caller.to_owned(),
        request_id: actor.request_id.to_owned(),
    };
    match sharing {
        Sharing::MayShare => pg.links.link(&pg.pool, request, until).await,
        Sharing::Alone => pg.links.link_alone(&pg.pool, request, until).await,
    }
}

/// The statement of a Link that goes alone: [`LINK_SQL`] for one pair,
/// written out for it (sea-query's CTE; a fifth cheaper for PostgreSQL to
/// run than the arrays, measured with pgbench in docs/PERFORMANCE.md), so
/// that a lone call pays nothing for sharing.
fn link_statement(
    insert: InsertStatement,
    user_id: &str,
    stripe_customer_id: &str,
    time: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<WithQuery, DbErr> {
    let ins = Alias::new("ins");
    let inserted = Alias::new("inserted");
    let mut created = Query::select();
    created
        .columns(COLUMNS)
        .expr_as(Expr::val(true), inserted.clone())
        .from(ins.clone());
    let mut holders: SelectStatement = Query::select();
    holders
        .columns(COLUMNS)
        .expr_as(Expr::val(false), inserted)
        .from(StripeCustomers)
        .cond_where(either_key(user_id, stripe_customer_id))
        .and_where(
            Expr::exists(
                Query::select()
                    .expr(Expr::val(1))
                    .from(ins.clone())
                    .to_owned(),
            )
            .not(),
        );
    created.union(UnionType::All, holders);
    let mut event = Query::insert();
    event
        .into_table(MappingEvents)
        .columns([
            EventColumn::Kind,
            EventColumn::UserId,
            EventColumn::StripeCustomerId,
            EventColumn::MappingCreatedAt,
            EventColumn::Time,
            EventColumn::Caller,
            EventColumn::RequestId,
        ])
        .select_from(
            Query::select()
                .expr(Expr::val(KIND_LINKED))
                .columns([Column::UserId, Column::StripeCustomerId, Column::CreatedAt])
                .expr(Expr::val(time))
                .expr(Expr::val(actor.caller))
                .expr(Expr::val(actor.request_id))
                .from(ins.clone())
                .to_owned(),
        )
        .map_err(|err| DbErr::Custom(format!("building the Link statement: {err}")))?;
    let ins_cte = CommonTableExpression::new()
        .query(insert)
        .table_name(ins)
        .to_owned();
    let event_cte = CommonTableExpression::new()
        .query(event)
        .table_name(Alias::new("ev"))
        .to_owned();
    Ok(WithClause::new()
        .cte(ins_cte)
        .cte(event_cte)
        .to_owned()
        .query(created))
}

/// The statement of Links that share it (see the module comment). Each
/// array holds one element per pair; the event of a created row gets its
/// pair's `time`, `caller` and `request_id`. The holders are looked up
/// pair by pair (`LATERAL`), so that each is one probe of a unique index
/// whatever the planner thinks of the table's size.
pub(super) const LINK_SQL: &str = "\
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

/// One pair of [`LINK_SQL`], as borrowed by its caller.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pair<'a> {
    pub user_id: &'a str,
    pub stripe_customer_id: &'a str,
    pub created_at: DateTime<Utc>,
    pub token: i64,
    /// The event's time, and who made the change.
    pub time: DateTime<Utc>,
    pub actor: Actor<'a>,
}

/// What [`LINK_SQL`] returned: the rows it inserted, and the rows holding
/// the user or the customer of a pair it did not insert.
#[derive(Debug, Default)]
pub(super) struct Linked {
    pub created: Vec<Model>,
    pub holders: Vec<Model>,
}

/// Runs [`link_statement`] for one pair on `conn`, by `until`.
pub(super) async fn link_one(
    mut conn: Checkout,
    pair: Pair<'_>,
    until: Instant,
) -> Result<Linked, DbErr> {
    let insert = insert_unless_either_key_taken(
        pair.user_id,
        pair.stripe_customer_id,
        pair.created_at,
        pair.token,
    );
    let stmt = DbBackend::Postgres.build(&link_statement(
        insert,
        pair.user_id,
        pair.stripe_customer_id,
        pair.time,
        pair.actor,
    )?);
    let rows = conn.fetch_all(&stmt, until).await?;
    conn.release();
    linked(rows)
}

/// Runs [`LINK_SQL`] for `pairs` (no two sharing a user or a customer) on
/// `conn`, by `until`.
pub(super) async fn link_pairs(
    mut conn: Checkout,
    pairs: &[Pair<'_>],
    what: &'static str,
    until: Instant,
) -> Result<Linked, DbErr> {
    let users: Vec<&str> = pairs.iter().map(|p| p.user_id).collect();
    let customers: Vec<&str> = pairs.iter().map(|p| p.stripe_customer_id).collect();
    let created_ats: Vec<DateTime<Utc>> = pairs.iter().map(|p| p.created_at).collect();
    let tokens: Vec<i64> = pairs.iter().map(|p| p.token).collect();
    let times: Vec<DateTime<Utc>> = pairs.iter().map(|p| p.time).collect();
    let callers: Vec<&str> = pairs.iter().map(|p| p.actor.caller).collect();
    let request_ids: Vec<&str> = pairs.iter().map(|p| p.actor.request_id).collect();
    let rows = conn
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
    linked(rows)
}

fn linked(rows: Vec<PgRow>) -> Result<Linked, DbErr> {
    let mut linked = Linked::default();
    for row in rows {
        let inserted: bool = row.try_get("inserted").map_err(sqlx_err)?;
        let model = model_of(row)?;
        if inserted {
            linked.created.push(model);
        } else {
            linked.holders.push(model);
        }
    }
    Ok(linked)
}

fn model_of(row: PgRow) -> Result<Model, DbErr> {
    Model::from_query_result(&QueryResult::from(row), "")
}

/// Each request's attempt, from what its shared statement returned.
pub(super) fn attempts<'a>(
    requests: impl IntoIterator<Item = &'a LinkRequest>,
    linked: Linked,
) -> Vec<LinkAttempt> {
    let mut created: HashMap<String, Model> = linked
        .created
        .into_iter()
        .map(|row| (row.user_id.clone(), row))
        .collect();
    let by_user: HashMap<&str, &Model> = linked
        .holders
        .iter()
        .map(|row| (row.user_id.as_str(), row))
        .collect();
    let by_customer: HashMap<&str, &Model> = linked
        .holders
        .iter()
        .map(|row| (row.stripe_customer_id.as_str(), row))
        .collect();
    requests
        .into_iter()
        .map(|request| {
            if let Some(row) = created.remove(&request.user_id) {
                return LinkAttempt::Created(row);
            }
            let user = by_user.get(request.user_id.as_str()).copied();
            let customer = by_customer
                .get(request.stripe_customer_id.as_str())
                .copied()
                .filter(|row| user.is_none_or(|user| user.id != row.id));
            LinkAttempt::Holders(user.into_iter().chain(customer).cloned().collect())
        })
        .collect()
}

/// What a failed statement means for a call that may go on until `until`:
/// run it again when nothing can have been written twice by doing so.
/// (Failing to get a connection is not repeated here: the pool has its own
/// bounds, and a database that cannot be reached is UNAVAILABLE.)
pub(super) fn after_failure(err: DbErr, until: Instant) -> Result<LinkAttempt, DbErr> {
    // The connection has been closed (never reused). Repeating is safe: an
    // aborted statement wrote nothing, and a lost one is recognised by its
    // token. A timeout is not repeated: there is no time left.
    if is_worth_repeating(&err) && Instant::now() < until {
        tracing::debug!(error = %err, "link attempt failed; repeating");
        Ok(LinkAttempt::Again)
    } else {
        Err(err)
    }
}

/// The database wrote nothing (it aborted the statement, or it is a
/// standby), or the connection was lost: running it again is safe.
pub(super) fn is_worth_repeating(err: &DbErr) -> bool {
    is_rolled_back_by_database(err) || is_connection_lost(err) || is_read_only(err)
}

fn either_key(user_id: &str, stripe_customer_id: &str) -> Condition {
    Condition::any()
        .add(Column::UserId.eq(user_id))
        .add(Column::StripeCustomerId.eq(stripe_customer_id))
}

async fn try_link_sqlite(
    db: &SqliteDb,
    insert: &InsertStatement,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    actor: Actor<'_>,
) -> Result<LinkAttempt, DbErr> {
    let in_transaction = async {
        let (turn, txn) = db.begin_write().await?;
        let inserted = StripeCustomers::find()
            .from_raw_sql(DbBackend::Sqlite.build(insert))
            .one(&txn)
            .await?;
        let attempt = match inserted {
            Some(model) => {
                // In the insert's transaction: the event commits iff the
                // row does.
                events::record(&txn, KIND_LINKED, &model, created_at, actor).await?;
                LinkAttempt::Created(model)
            }
            None => LinkAttempt::Holders(
                StripeCustomers::find()
                    .filter(either_key(user_id, stripe_customer_id))
                    .all(&txn)
                    .await?,
            ),
        };
        Ok::<_, DbErr>((turn, txn, attempt))
    };
    let (_turn, txn, attempt) = match in_transaction.await {
        Ok(done) => done,
        Err(err) if is_rolled_back_by_database(&err) || is_connection_lost(&err) => {
            tracing::debug!(error = %err, "link attempt rolled back; repeating");
            return Ok(LinkAttempt::Again);
        }
        Err(err) => return Err(err),
    };
    txn.commit().await?;
    Ok(attempt)
}

/// `INSERT ... ON CONFLICT DO NOTHING RETURNING *`, with no conflict target
/// so that a conflict on *either* unique index does nothing. Run by hand
/// rather than through `TryInsert`, whose `exec_with_returning` reports an
/// empty RETURNING as an error instead of a conflict.
fn insert_unless_either_key_taken(
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    token: i64,
) -> InsertStatement {
    let row = ActiveModel {
        user_id: Set(user_id.to_owned()),
        stripe_customer_id: Set(stripe_customer_id.to_owned()),
        created_at: Set(created_at),
        link_token: Set(Some(token)),
        ..Default::default()
    };
    StripeCustomers::insert(row)
        .on_conflict(OnConflict::new().do_nothing().to_owned())
        .into_query()
        .returning_all()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_line(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn link_insert_does_nothing_on_either_key_and_returns_the_row() {
        let insert = insert_unless_either_key_taken("u", "cus_1", DateTime::UNIX_EPOCH, 7);
        for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
            let sql = one_line(&backend.build(&insert).sql);
            assert!(
                sql.ends_with(") ON CONFLICT DO NOTHING RETURNING *"),
                "{backend:?}: {sql}"
            );
        }
    }

    fn row(id: i64, user: &str, customer: &str) -> Model {
        Model {
            id,
            user_id: user.to_owned(),
            stripe_customer_id: customer.to_owned(),
            created_at: DateTime::UNIX_EPOCH,
            link_token: None,
        }
    }

    fn ids(attempt: &LinkAttempt) -> Vec<i64> {
        match attempt {
            LinkAttempt::Created(row) => vec![-row.id],
            LinkAttempt::Holders(rows) => rows.iter().map(|r| r.id).collect(),
            LinkAttempt::Again => vec![i64::MIN],
        }
    }

    #[test]
    fn each_pair_of_a_shared_statement_gets_its_own_outcome() {
        let requests = [
            LinkRequest::of("new", "cus_new"),   // inserted
            LinkRequest::of("u1", "cus_1"),      // a replay: its own row
            LinkRequest::of("u2", "cus_other"),  // the user is taken
            LinkRequest::of("u3", "cus_3"),      // the customer is taken (by u9)
            LinkRequest::of("u4", "cus_4"),      // both, by two rows
            LinkRequest::of("late", "cus_late"), // conflicted with a row it cannot see
        ];
        let linked = Linked {
            created: vec![row(10, "new", "cus_new")],
            holders: vec![
                row(1, "u1", "cus_1"),
                row(2, "u2", "cus_2"),
                row(3, "u9", "cus_3"),
                row(4, "u4", "cus_x"),
                row(5, "u8", "cus_4"),
            ],
        };
        let attempts = attempts(&requests, linked);
        let got: Vec<Vec<i64>> = attempts.iter().map(ids).collect();
        assert_eq!(
            got,
            [vec![-10], vec![1], vec![2], vec![3], vec![4, 5], vec![]]
        );
    }
}

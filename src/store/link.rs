//! Link: one statement on PostgreSQL, one transaction on SQLite.
//!
//! # The statement (PostgreSQL)
//!
//! ```sql
//! WITH ins AS (
//!     INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at, link_token)
//!     VALUES ($user, $customer, $now, $token)
//!     ON CONFLICT DO NOTHING
//!     RETURNING *
//! )
//! SELECT *, TRUE AS inserted FROM ins
//! UNION ALL
//! SELECT *, FALSE FROM stripe_customers
//! WHERE (user_id = $user OR stripe_customer_id = $customer)
//!   AND NOT EXISTS (SELECT 1 FROM ins)
//! ```
//!
//! sent alone, in autocommit: one round trip on every path (new, replay,
//! conflict), no BEGIN, no COMMIT. Built with sea-query (`WithClause`,
//! `UnionType::All`); nothing here is raw SQL.
//!
//! # Why the answer is linearizable
//!
//! 1. The insert is arbitrated by the two unique indexes, not by any read:
//!    if another session holds an uncommitted row with either key, the
//!    insert waits for it to end, then inserts or does nothing because a
//!    *committed* row holds a key. Two Links can never both insert, and an
//!    inserted row is ours: `Created` takes effect at the statement's commit.
//! 2. When the insert did nothing, the second branch returns the rows that
//!    held the user or the customer in the statement's snapshot. Under READ
//!    COMMITTED the snapshot is taken when the statement starts, after the
//!    call began, and it is one consistent state: every row holding either
//!    key at that instant, and no other. The decision the service takes from
//!    them (the user's row decides, then the customer's) is exactly what a
//!    Link at that instant would answer, so the snapshot's instant is the
//!    linearization point of a replay or a conflict.
//! 3. The insert checks the indexes against the latest committed rows, not
//!    against the snapshot. So it can conflict with a row committed after
//!    the snapshot was taken (it waited for that transaction), which the
//!    second branch cannot see: then the statement returns no row at all.
//!    Nothing was written and the snapshot said the keys were free, so no
//!    answer is justified yet: [`LinkAttempt::Holders`] is empty and the
//!    caller runs the statement again (bounded), with a fresh snapshot. A
//!    row unlinked between the snapshot and the insert is harmless: the
//!    insert succeeds (a deleted row is no conflict) and `NOT EXISTS` hides
//!    the stale branch.
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
//! a lost connection and an Unlink of the same keys inside one call; a
//! record of past tokens (the audit trail of issue 15) would close it.
//!
//! # The audit event
//!
//! The `KIND_LINKED` event of a created mapping is one more data-modifying
//! CTE of the same statement, `ev AS (INSERT INTO mapping_events (...)
//! SELECT ... FROM ins)`: PostgreSQL runs every data-modifying CTE exactly
//! once, referenced or not, in the same snapshot and the same autocommit
//! transaction, so the event exists if and only if `ins` inserted, and Link
//! stays one round trip.
//!
//! # SQLite
//!
//! Writers are serialized (the service's writer queue and `BEGIN
//! IMMEDIATE`), so the insert and the read of the holders run in one
//! transaction that sees exactly what the insert conflicted with.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryResult, QueryTrait, Set,
    sea_query::{
        Alias, CommonTableExpression, Expr, ExprTrait, InsertStatement, OnConflict, Query,
        SelectStatement, UnionType, WithClause, WithQuery,
    },
    sqlx::Row,
};
use tokio::time::Instant;

use super::{
    Backend, Database, SqliteDb,
    entity::{ActiveModel, Column, Entity as StripeCustomers, Model},
    errors::{is_connection_lost, is_read_only, is_rolled_back_by_database},
    event_entity::{Column as EventColumn, Entity as MappingEvents},
    events::{self, Actor, KIND_LINKED},
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

/// One attempt to link `user_id` to `stripe_customer_id` for the call
/// holding `token`, done or failed by `until`.
pub async fn try_link(
    db: &Database,
    user_id: &str,
    stripe_customer_id: &str,
    created_at: DateTime<Utc>,
    token: i64,
    actor: Actor<'_>,
    until: Instant,
) -> Result<LinkAttempt, DbErr> {
    let insert = insert_unless_either_key_taken(user_id, stripe_customer_id, created_at, token);
    let pool = match &db.0 {
        Backend::Postgres(pg) => &pg.pool,
        Backend::Sqlite(db) => {
            return try_link_sqlite(db, &insert, user_id, stripe_customer_id, created_at, actor)
                .await;
        }
    };
    let stmt = DbBackend::Postgres.build(&link_statement(
        insert,
        user_id,
        stripe_customer_id,
        created_at,
        actor,
    )?);
    let mut conn = pool.acquire(until).await?;
    let rows = match conn.fetch_all(&stmt, until).await {
        Ok(rows) => rows,
        // The connection has been closed (never reused). Repeating is safe:
        // an aborted statement wrote nothing, and a lost one is recognised
        // by its token. A timeout is not repeated: there is no time left.
        Err(err) if is_worth_repeating(&err) && Instant::now() < until => {
            tracing::debug!(error = %err, "link attempt failed; repeating");
            return Ok(LinkAttempt::Again);
        }
        Err(err) => return Err(err),
    };
    conn.release();
    let mut created = None;
    let mut holders = Vec::with_capacity(rows.len());
    for row in rows {
        let inserted: bool = row.try_get("inserted").map_err(super::postgres::sqlx_err)?;
        let model = Model::from_query_result(&QueryResult::from(row), "")?;
        if inserted {
            created = Some(model);
        } else {
            holders.push(model);
        }
    }
    Ok(match created {
        Some(model) => LinkAttempt::Created(model),
        None => LinkAttempt::Holders(holders),
    })
}

fn is_worth_repeating(err: &DbErr) -> bool {
    is_rolled_back_by_database(err) || is_connection_lost(err) || is_read_only(err)
}

/// The one statement of a PostgreSQL Link (see the module comment).
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

    #[test]
    fn the_postgres_link_is_one_statement_inserting_or_returning_the_holders() {
        let insert = insert_unless_either_key_taken("u", "cus_1", DateTime::UNIX_EPOCH, 7);
        let actor = Actor {
            caller: "c",
            request_id: "r",
        };
        let stmt = DbBackend::Postgres.build(
            &link_statement(insert, "u", "cus_1", DateTime::UNIX_EPOCH, actor)
                .expect("the statement builds"),
        );
        let sql = one_line(&stmt.sql);
        assert!(
            sql.starts_with(r#"WITH "ins" AS (INSERT INTO "stripe_customers""#),
            "{sql}"
        );
        assert!(sql.contains("ON CONFLICT DO NOTHING RETURNING *)"), "{sql}");
        assert!(sql.contains("UNION ALL"), "{sql}");
        assert!(
            sql.contains(r#""ev" AS (INSERT INTO "mapping_events""#),
            "the event is recorded by the same statement: {sql}"
        );
        assert!(
            sql.contains(r#"NOT EXISTS(SELECT $"#) || sql.contains("NOT EXISTS (SELECT"),
            "{sql}"
        );
        assert!(!sql.contains("BEGIN") && !sql.contains("COMMIT"), "{sql}");
    }
}

//! Upgrading to Stripe accounts while the previous release still serves
//! the same database: its writes go on through the migration and are all
//! kept, its answers stay right while no connected account has mappings,
//! and connected accounts wait for the upgrade's last step.

use crate::helpers;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use customer_mapping::{config::MigrateArgs, proto::get_request};
use helpers::{Backend, TestDatabase, spawn_on, test_settings};
use migration::MigratorTrait;
use sea_orm::{
    ConnectionTrait,
    sqlx::{self, PgPool, Postgres, Row, pool::PoolConnection},
};
use tonic::Code;
use tonic_types::StatusExt;

/// The migrations of the previous release.
const PREVIOUS_RELEASE_MIGRATIONS: u32 = 5;

/// The previous release's Link, word for word: it names no account.
const PREVIOUS_RELEASE_LINK: &str = "\
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

/// The previous release's Unlink by user, word for word.
const PREVIOUS_RELEASE_UNLINK: &str = "\
WITH removed AS (DELETE FROM stripe_customers WHERE user_id = $1 RETURNING *), \
recorded AS (INSERT INTO mapping_events \
  (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id) \
  SELECT $2, user_id, stripe_customer_id, created_at, $3, $4, $5 FROM removed) \
SELECT TRUE AS removed, * FROM removed";

/// Links `user-{n}` to `cus_P{n}` as the previous release does; whether it
/// was created (`false`: already linked).
async fn previous_release_link(pool: &PgPool, n: u32) -> Result<bool, sqlx::Error> {
    let now = chrono::Utc::now();
    let mut conn = pool.acquire().await?;
    let rows = sqlx::query(PREVIOUS_RELEASE_LINK)
        .bind(vec![format!("user-{n}")])
        .bind(vec![format!("cus_P{n}")])
        .bind(vec![now])
        .bind(vec![i64::from(n)])
        .bind(vec![now])
        .bind(vec!["previous-release".to_owned()])
        .bind(vec![format!("req-{n}")])
        .bind(1_i16)
        .fetch_all(&mut *conn)
        .await
        .or_else(|err| discarding(conn, err))?;
    let row = rows.first().expect("the Link's row");
    let inserted: bool = row.try_get("inserted")?;
    let customer: String = row.try_get("stripe_customer_id")?;
    assert_eq!(
        customer,
        format!("cus_P{n}"),
        "the previous release's answer"
    );
    Ok(inserted)
}

async fn previous_release_unlink(pool: &PgPool, n: u32) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let removed = sqlx::query(PREVIOUS_RELEASE_UNLINK)
        .bind(format!("user-{n}"))
        .bind(2_i16)
        .bind(chrono::Utc::now())
        .bind("previous-release")
        .bind(format!("unlink-{n}"))
        .fetch_optional(&mut *conn)
        .await
        .or_else(|err| discarding(conn, err))?;
    Ok(removed.is_some())
}

/// As the previous release does with a connection whose statement failed:
/// closes it rather than reuse it, and answers the error.
fn discarding<T>(conn: PoolConnection<Postgres>, err: sqlx::Error) -> Result<T, sqlx::Error> {
    drop(conn.detach());
    Err(err)
}

/// The one error the previous release may answer during the upgrade: its
/// Unlink returns `*`, and the table gained a column under a statement
/// it had prepared. Nothing was written; the same call on its next
/// (fresh) connection succeeds.
fn is_changed_result_type(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("0A000"))
}

/// The previous release writes (Links, and Unlinks of every third) from
/// before this release's migrations to after its server serves; every
/// write it acknowledged is in the table, in the platform's account, and
/// this release answers for it. Connected accounts are refused until the
/// upgrade's last step, then work without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_keeps_writing_through_the_upgrade_and_loses_nothing() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url.clone();
    let db = sea_orm::Database::connect(&url).await.expect("connects");
    migration::Migrator::up(&db, Some(PREVIOUS_RELEASE_MIGRATIONS))
        .await
        .expect("the previous release's migrations");
    db.close().await.expect("closes");
    let pool = PgPool::connect(&url).await.expect("a pool");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut linked, mut unlinked) = (HashSet::new(), HashSet::new());
            let (mut n, mut refused) = (0, 0);
            while !stop.load(Ordering::Relaxed) || n < 200 {
                if previous_release_link(&pool, n).await.expect("a Link") {
                    linked.insert(n);
                }
                if n % 3 == 0 {
                    match previous_release_unlink(&pool, n).await {
                        Ok(true) => _ = unlinked.insert(n),
                        Ok(false) => {}
                        Err(err) if is_changed_result_type(&err) => refused += 1,
                        Err(err) => panic!("an Unlink: {err}"),
                    }
                }
                n += 1;
            }
            (linked, unlinked, n, refused)
        })
    };
    // This release migrates and serves while the previous one writes.
    let app = spawn_on(
        Backend::Postgres,
        TestDatabase::external(url.clone()),
        test_settings(url.clone()),
    )
    .await;
    app.link("user-new", "cus_New")
        .await
        .expect("this release's Link");
    stop.store(true, Ordering::Relaxed);
    let (linked, unlinked, written, refused) = writer.await.expect("the writer ran");
    assert!(unlinked.iter().all(|n| linked.contains(n)));

    let rows: HashSet<(String, String, String)> =
        sqlx::query("SELECT user_id, stripe_customer_id, stripe_account FROM stripe_customers")
            .fetch_all(&pool)
            .await
            .expect("rows")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
    let kept: HashSet<(String, String, String)> = linked
        .difference(&unlinked)
        .map(|n| (format!("user-{n}"), format!("cus_P{n}"), String::new()))
        .chain([("user-new".into(), "cus_New".into(), String::new())])
        .collect();
    assert_eq!(rows, kept, "every acknowledged write, and nothing else");
    for n in linked.difference(&unlinked).take(20) {
        let found = app.get_by_user(&format!("user-{n}")).await.expect("Get");
        assert_eq!(found.stripe_customer_id, format!("cus_P{n}"));
    }
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mapping_events WHERE caller = 'previous-release' \
         AND stripe_account = ''",
    )
    .fetch_one(&pool)
    .await
    .expect("events");
    assert_eq!(events as usize, linked.len() + unlinked.len());

    // The previous release's answers hold while no connected account has
    // mappings: so connected accounts wait for the last step.
    for status in [
        app.link_in("acct_1", "user-new", "cus_Other")
            .await
            .expect_err("not yet"),
        app.client
            .clone()
            .prepare_link(customer_mapping::proto::PrepareLinkRequest {
                user_id: "user-new".into(),
                stripe_account: "acct_1".into(),
            })
            .await
            .expect_err("not yet"),
    ] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "STRIPE_ACCOUNTS_NOT_ENABLED");
    }

    let dir = tempfile::tempdir().expect("a directory");
    let csv = helpers::import::write_csv(
        dir.path(),
        "in.csv",
        "user_id,stripe_customer_id\nuser-new,cus_I1\n",
    );
    let import = helpers::import::import_csv(
        &url,
        &csv,
        &dir.path().join("report.csv"),
        &["--stripe-account", "acct_1"],
    )
    .await;
    assert_eq!(
        import.code, 3,
        "an import into an account waits too: {:?}",
        import.events
    );
    let per_row = helpers::import::write_csv(
        dir.path(),
        "accounts.csv",
        "user_id,stripe_customer_id,stripe_account\nuser-new,cus_I1,acct_1\n",
    );
    let import = helpers::import::import_csv(
        &url,
        &per_row,
        &dir.path().join("report.csv"),
        &["--account-column", "stripe_account"],
    )
    .await;
    assert_eq!(
        import.code, 3,
        "so does one whose rows name their accounts: {:?}",
        import.events
    );

    customer_mapping::startup::migrate(
        &test_settings(url.clone()).database,
        &MigrateArgs {
            enable_stripe_accounts: true,
        },
    )
    .await
    .expect("the upgrade's last step");
    let other = app
        .link_in("acct_1", "user-new", "cus_Other")
        .await
        .expect("connected accounts work, no restart needed");
    assert!(other.created);
    let own = app
        .get_in("", get_request::Key::UserId("user-new".into()))
        .await
        .expect("Get");
    assert_eq!(own.stripe_customer_id, "cus_New");
    helpers::report(&format!(
        "upgrade: the previous release wrote {written} Links through the migration, {} kept, \
         0 lost; {refused} of its Unlinks refused once per connection (nothing written)",
        kept.len() - 1
    ));
    pool.close().await;
    app.stop().await;
    drop(database);
}

/// SQLite rebuilds its table (it cannot drop a column's UNIQUE): rows,
/// their ids and the audit trail come through, and accounts work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_of_the_previous_schema_is_rebuilt_with_its_rows() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let url = database.url.clone();
    let db = sea_orm::Database::connect(&url).await.expect("connects");
    migration::Migrator::up(&db, Some(PREVIOUS_RELEASE_MIGRATIONS))
        .await
        .expect("the previous release's migrations");
    for n in 1..=3 {
        db.execute_unprepared(&format!(
            "INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
             VALUES ('user-{n}', 'cus_S{n}', '2026-12-01T00:00:00Z')"
        ))
        .await
        .expect("a previous release's row");
    }
    db.execute_unprepared("DELETE FROM stripe_customers WHERE user_id = 'user-3'")
        .await
        .expect("a removed row: its id is never reused");
    db.close().await.expect("closes");

    let app = spawn_on(
        Backend::Sqlite,
        TestDatabase::external(url.clone()),
        test_settings(url),
    )
    .await;
    for n in 1..=2 {
        let found = app.get_by_user(&format!("user-{n}")).await.expect("kept");
        assert_eq!(found.stripe_customer_id, format!("cus_S{n}"));
    }
    app.link_in("acct_1", "user-1", "cus_S2")
        .await
        .expect("the same ids in a connected account");
    app.link("user-4", "cus_S4").await.expect("Link");
    let db = app.db().await;
    let ids: Vec<(String, i64)> = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "SELECT user_id, id FROM stripe_customers WHERE stripe_account = '' ORDER BY id",
        ))
        .await
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r.try_get_by_index(0).expect("user"),
                r.try_get_by_index(1).expect("id"),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("user-1".into(), 1),
            ("user-2".into(), 2),
            ("user-4".into(), 5)
        ],
        "ids kept, and the removed row's id not reused"
    );
    db.close().await.expect("closes");
    app.stop().await;
}

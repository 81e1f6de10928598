//! `customer-mapping import`, run as the built binary against the database
//! of a serving test server: Link's rules row by row, a report with every
//! refusal reason, dry runs, re-runs, the replaced application's own table
//! as a source, bad arguments, SIGINT mid-way, and Links through the
//! server while an import runs.

use crate::helpers;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
};

use customer_mapping::proto::{get_request, mapping_event::Kind};
use futures::StreamExt;
use helpers::{
    Backend, TestApp, TestDatabase,
    bulk::{events_all, pair, user},
    import::{ImportProcess, import, import_csv, numbered_csv, write_csv},
    pg,
    process::BINARY,
};
use sea_orm::{ConnectionTrait, Database, Statement};

on_both_databases!(
    every_row_gets_links_rules_and_every_refusal_is_reported,
    a_second_run_creates_nothing_and_refuses_the_same_rows,
    a_dry_run_reports_the_same_and_writes_nothing,
    the_replaced_applications_table_is_read_directly,
    of_two_contradicting_rows_the_first_in_primary_key_order_wins,
    links_through_the_server_during_an_import_are_arbitrated_by_the_same_constraints,
    a_file_is_imported_into_the_stripe_account_it_names,
    each_row_goes_into_the_stripe_account_its_column_names,
    a_tables_account_column_is_read_with_null_as_the_platforms_account,
);

/// A CSV with one row of every kind, for a database where `user-taken` is
/// linked to `cus_T1`, `user-T2` to `cus_taken` and `user-same` to
/// `cus_same` before the import.
const EVERY_KIND: &str = "\
user_id,stripe_customer_id,created_at
user-1,cus_A1,2020-01-02T03:04:05.123456Z
user-2,cus_A2,
user-1,cus_A1,
user-same,cus_same,
user-taken,cus_B1,
user-3,cus_taken,
user-1,cus_B2,
user-4,cus_A2,
bad user,cus_B3,
user-5,cus_bad-id,
user-6,cus_B4,yesterday
user-7
";

/// The report of [`EVERY_KIND`]: `(line, user, customer, reason, existing
/// user, existing customer)`.
const EVERY_KIND_REFUSED: [(&str, &str, &str, &str, &str, &str); 8] = [
    (
        "6",
        "user-taken",
        "cus_B1",
        "USER_ALREADY_LINKED",
        "user-taken",
        "cus_T1",
    ),
    (
        "7",
        "user-3",
        "cus_taken",
        "CUSTOMER_ALREADY_LINKED",
        "user-T2",
        "cus_taken",
    ),
    (
        "8",
        "user-1",
        "cus_B2",
        "CONFLICT_IN_INPUT",
        "user-1",
        "cus_A1",
    ),
    (
        "9",
        "user-4",
        "cus_A2",
        "CONFLICT_IN_INPUT",
        "user-2",
        "cus_A2",
    ),
    ("10", "bad user", "cus_B3", "INVALID_USER_ID", "", ""),
    (
        "11",
        "user-5",
        "cus_bad-id",
        "INVALID_STRIPE_CUSTOMER_ID",
        "",
        "",
    ),
    ("12", "user-6", "cus_B4", "INVALID_CREATED_AT", "", ""),
    ("13", "user-7", "", "MALFORMED_ROW", "", ""),
];

/// The report's rows, header first.
fn read_report(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .expect("the report exists");
    reader
        .records()
        .map(|r| r.expect("a CSV record").iter().map(str::to_owned).collect())
        .collect()
}

fn report_rows(path: &Path) -> Vec<(String, String, String, String, String, String)> {
    let rows = read_report(path);
    assert_eq!(
        rows[0],
        [
            "line",
            "user_id",
            "stripe_customer_id",
            "reason",
            "existing_user_id",
            "existing_stripe_customer_id",
            "detail"
        ]
    );
    rows[1..]
        .iter()
        .map(|r| {
            assert!(!r[6].is_empty(), "every refusal says why: {r:?}");
            (
                r[0].clone(),
                r[1].clone(),
                r[2].clone(),
                r[3].clone(),
                r[4].clone(),
                r[5].clone(),
            )
        })
        .collect()
}

fn expected(
    rows: &[(&str, &str, &str, &str, &str, &str)],
) -> Vec<(String, String, String, String, String, String)> {
    rows.iter()
        .map(|(a, b, c, d, e, f)| {
            (
                (*a).into(),
                (*b).into(),
                (*c).into(),
                (*d).into(),
                (*e).into(),
                (*f).into(),
            )
        })
        .collect()
}

async fn link_the_existing_mappings(app: &TestApp) {
    for (u, c) in [
        ("user-taken", "cus_T1"),
        ("user-T2", "cus_taken"),
        ("user-same", "cus_same"),
    ] {
        assert!(app.link(u, c).await.expect("Link").created);
    }
}

fn sorted(rows: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut rows = rows;
    rows.sort();
    rows
}

async fn every_row_gets_links_rules_and_every_refusal_is_reported(app: TestApp) {
    link_the_existing_mappings(&app).await;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(dir.path(), "in.csv", EVERY_KIND);
    let report = dir.path().join("report.csv");

    let run = import_csv(&app.database.url, &csv, &report, &[]).await;

    assert_eq!(run.code, 1, "rows were refused: {:?}", run.events);
    assert_eq!(run.counts(), (12, 2, 2, 8));
    assert_eq!(report_rows(&report), expected(&EVERY_KIND_REFUSED));
    // Through the serving server: the source's time is kept.
    let imported = app.get_by_user("user-1").await.expect("Get");
    assert_eq!(imported.stripe_customer_id, "cus_A1");
    assert_eq!(
        imported.create_time.map(|t| (t.seconds, t.nanos)),
        Some((1_577_934_245, 123_456_000))
    );
    assert_eq!(
        app.get_by_user("user-2")
            .await
            .expect("Get")
            .stripe_customer_id,
        "cus_A2"
    );
    assert_eq!(
        sorted(app.rows().await),
        sorted(
            [
                ("user-1", "cus_A1"),
                ("user-2", "cus_A2"),
                ("user-T2", "cus_taken"),
                ("user-same", "cus_same"),
                ("user-taken", "cus_T1"),
            ]
            .map(|(u, c)| (u.to_owned(), c.to_owned()))
            .to_vec()
        ),
        "nothing refused was written, nothing existing overwritten"
    );
    // One event per created mapping, by `import`, named by the run.
    let events = events_all(&mut app.client.clone(), Some(user("user-1")), 0).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind(), Kind::Linked);
    assert_eq!(events[0].caller, "import");
    assert!(events[0].request_id.starts_with("import-"), "{events:?}");
    assert_eq!(
        events[0].mapping.as_ref().map(pair),
        Some(("user-1".into(), "cus_A1".into()))
    );
    let all = events_all(&mut app.client.clone(), None, 0).await;
    assert_eq!(all.iter().filter(|e| e.caller == "import").count(), 2);
}

/// `--stripe-account`: every row goes into that account, where the
/// platform's mappings of the same ids are other keys; conflicts are
/// within the account.
async fn a_file_is_imported_into_the_stripe_account_it_names(app: TestApp) {
    link_the_existing_mappings(&app).await;
    app.link_in("acct_1", "user-9", "cus_C9")
        .await
        .expect("a Link in the account");
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(
        dir.path(),
        "in.csv",
        "user_id,stripe_customer_id\nuser-taken,cus_B1\nuser-8,cus_T1\nuser-9,cus_B2\n",
    );
    let report = dir.path().join("report.csv");

    let run = import_csv(
        &app.database.url,
        &csv,
        &report,
        &["--stripe-account", "acct_1"],
    )
    .await;

    assert_eq!(
        run.code, 1,
        "one row conflicts in the account: {:?}",
        run.events
    );
    assert_eq!(run.counts(), (3, 2, 0, 1));
    let refused = report_rows(&report);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0].1.as_str(), refused[0].5.as_str()),
        ("user-9", "cus_C9"),
        "refused for the account's own mapping"
    );
    let in_account = |u: &str| app.get_in("acct_1", get_request::Key::UserId(u.to_owned()));
    let taken = in_account("user-taken").await.expect("Get in the account");
    assert_eq!(
        (
            taken.stripe_customer_id.as_str(),
            taken.stripe_account.as_str()
        ),
        ("cus_B1", "acct_1")
    );
    assert_eq!(
        in_account("user-8").await.expect("Get").stripe_customer_id,
        "cus_T1"
    );
    assert_eq!(
        in_account("user-9").await.expect("Get").stripe_customer_id,
        "cus_C9"
    );
    let platform = app.get_by_user("user-taken").await.expect("the platform's");
    assert_eq!(
        platform.stripe_customer_id, "cus_T1",
        "the platform's mapping is untouched"
    );

    let bad = import_csv(
        &app.database.url,
        &csv,
        &report,
        &["--stripe-account", "acct-1"],
    )
    .await;
    assert_eq!(bad.code, 2, "a malformed account is refused before reading");
}

/// A file whose rows name their accounts (`--account-column
/// stripe_account`), for a database where the platform and `acct_1` both
/// link `user-taken` to `cus_T1`. Link's rules apply within each account.
const IN_THEIR_ACCOUNTS: &str = "\
user_id,stripe_customer_id,stripe_account
user-1,cus_A1,
user-1,cus_A1,acct_1
user-1,cus_A2,acct_2
user-taken,cus_B1,acct_1
user-2,cus_A1,acct_1
user-3,cus_A3,acct-3
user-4,cus_A4,acct_1
user-T2,cus_taken,
";

/// The report of [`IN_THEIR_ACCOUNTS`]: `(line, user, customer, account,
/// reason, existing user, existing customer)`.
const IN_THEIR_ACCOUNTS_REFUSED: [[&str; 7]; 3] = [
    [
        "5",
        "user-taken",
        "cus_B1",
        "acct_1",
        "USER_ALREADY_LINKED",
        "user-taken",
        "cus_T1",
    ],
    [
        "6",
        "user-2",
        "cus_A1",
        "acct_1",
        "CONFLICT_IN_INPUT",
        "user-1",
        "cus_A1",
    ],
    [
        "7",
        "user-3",
        "cus_A3",
        "acct-3",
        "INVALID_STRIPE_ACCOUNT",
        "",
        "",
    ],
];

/// A report with a `stripe_account` column: its rows without the detail.
fn report_rows_with_accounts(path: &Path) -> Vec<Vec<String>> {
    let rows = read_report(path);
    assert!(["line", "row"].contains(&rows[0][0].as_str()), "{rows:?}");
    assert_eq!(
        rows[0][1..],
        [
            "user_id",
            "stripe_customer_id",
            "stripe_account",
            "reason",
            "existing_user_id",
            "existing_stripe_customer_id",
            "detail"
        ]
    );
    rows[1..]
        .iter()
        .map(|r| {
            assert!(!r[7].is_empty(), "every refusal says why: {r:?}");
            r[..7].to_vec()
        })
        .collect()
}

/// `--account-column`: each row is linked in the account it names, the
/// same user or customer may be linked in many, and a dry run, which
/// decides conflicts within the input itself, tells accounts apart too.
async fn each_row_goes_into_the_stripe_account_its_column_names(app: TestApp) {
    link_the_existing_mappings(&app).await;
    app.link_in("acct_1", "user-taken", "cus_T1")
        .await
        .expect("a Link in the account");
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(dir.path(), "in.csv", IN_THEIR_ACCOUNTS);
    let (dry, real) = (dir.path().join("dry.csv"), dir.path().join("real.csv"));
    let by_column = ["--account-column", "stripe_account"];
    let before = events_all(&mut app.client.clone(), None, 0).await;

    let preview = import_csv(
        &app.database.url,
        &csv,
        &dry,
        &[&by_column[..], &["--dry-run"]].concat(),
    )
    .await;
    let run = import_csv(&app.database.url, &csv, &real, &by_column).await;

    assert_eq!(run.code, 1, "rows were refused: {:?}", run.events);
    assert_eq!(run.counts(), (8, 4, 1, 3));
    assert_eq!(preview.counts(), run.counts(), "{:?}", preview.events);
    assert_eq!(
        report_rows_with_accounts(&real),
        IN_THEIR_ACCOUNTS_REFUSED.map(|row| row.map(str::to_owned))
    );
    let reason = |rows: Vec<Vec<String>>| {
        rows.into_iter()
            .map(|r| (r[0].clone(), r[4].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        reason(report_rows_with_accounts(&dry)),
        reason(report_rows_with_accounts(&real))
    );
    let customer_in = |account: &'static str, user: &'static str| {
        let app = &app;
        async move {
            app.get_in(account, get_request::Key::UserId(user.to_owned()))
                .await
                .map(|m| (m.stripe_customer_id, m.stripe_account))
        }
    };
    for (account, user, customer) in [
        ("", "user-1", "cus_A1"),
        ("acct_1", "user-1", "cus_A1"),
        ("acct_2", "user-1", "cus_A2"),
        ("acct_1", "user-4", "cus_A4"),
        ("acct_1", "user-taken", "cus_T1"),
    ] {
        assert_eq!(
            customer_in(account, user).await.expect("Get"),
            (customer.to_owned(), account.to_owned())
        );
    }
    // Every created mapping's event names its account.
    let mut created: Vec<(String, String)> = events_all(&mut app.client.clone(), None, 0)
        .await
        .into_iter()
        .skip(before.len())
        .map(|event| {
            assert_eq!(event.kind(), Kind::Linked);
            let mapping = event.mapping.expect("a mapping");
            (mapping.stripe_account, mapping.user_id)
        })
        .collect();
    created.sort();
    assert_eq!(
        created,
        [
            ("", "user-1"),
            ("acct_1", "user-1"),
            ("acct_1", "user-4"),
            ("acct_2", "user-1")
        ]
        .map(|(a, u)| (a.to_owned(), u.to_owned()))
    );
}

/// A Connect platform's own table, keyed by `id`, keeping each customer's
/// account in `account` (NULL: the platform's own).
async fn connect_platform_table() -> TestDatabase {
    let source = TestDatabase::create(Backend::Postgres).await;
    let db = Database::connect(&source.url).await.expect("connects");
    db.execute_unprepared(
        "CREATE TABLE customers (id INT PRIMARY KEY, user_id TEXT, stripe_customer_id TEXT, \
         account TEXT); INSERT INTO customers VALUES (1, 'user-1', 'cus_A1', NULL), \
         (2, 'user-1', 'cus_A1', 'acct_1'), (3, 'user-1', 'cus_B1', 'acct_1'), \
         (4, 'user-2', 'cus_A2', 'acct 2'), (5, 'user-3', 'cus_A3', '')",
    )
    .await
    .expect("the platform's table");
    db.close().await.expect("closes");
    source
}

async fn a_tables_account_column_is_read_with_null_as_the_platforms_account(app: TestApp) {
    let dir = tempfile::tempdir().expect("a directory");
    let report = dir.path().join("report.csv");
    let source = connect_platform_table().await;

    let run = import(
        &app.database.url,
        &[
            "--from-database-url",
            &source.url,
            "--table",
            "customers",
            "--account-column",
            "account",
            "--report",
            report.to_str().expect("a path"),
        ],
    )
    .await;

    assert_eq!(run.code, 1, "{:?}", run.events);
    assert_eq!(run.counts(), (5, 3, 0, 2));
    let refused: Vec<Vec<String>> = report_rows_with_accounts(&report)
        .into_iter()
        .map(|r| [&r[0], &r[3], &r[4], &r[5]].map(String::clone).to_vec())
        .collect();
    assert_eq!(
        refused,
        [
            ["3", "acct_1", "CONFLICT_IN_INPUT", "user-1"],
            ["4", "acct 2", "INVALID_STRIPE_ACCOUNT", ""],
        ]
        .map(|row| row.map(str::to_owned).to_vec())
    );
    let db = app.db().await;
    let mut mappings = helpers::read_mappings(&db).await;
    db.close().await.expect("closes");
    mappings.sort();
    assert_eq!(
        mappings,
        [
            ("user-1", "cus_A1", ""),
            ("user-1", "cus_A1", "acct_1"),
            ("user-3", "cus_A3", ""),
        ]
        .map(|(u, c, a)| (u.to_owned(), c.to_owned(), a.to_owned()))
    );
}

async fn a_second_run_creates_nothing_and_refuses_the_same_rows(app: TestApp) {
    link_the_existing_mappings(&app).await;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(dir.path(), "in.csv", EVERY_KIND);
    let (first, second) = (dir.path().join("1.csv"), dir.path().join("2.csv"));
    let run = import_csv(&app.database.url, &csv, &first, &[]).await;
    assert_eq!(run.counts(), (12, 2, 2, 8));
    let rows = sorted(app.rows().await);
    let events = events_all(&mut app.client.clone(), None, 0).await;

    let again = import_csv(&app.database.url, &csv, &second, &[]).await;

    assert_eq!(again.code, 1);
    assert_eq!(
        again.counts(),
        (12, 0, 4, 8),
        "the created rows are present now"
    );
    assert_eq!(
        read_report(&second),
        read_report(&first),
        "the same refusals"
    );
    assert_eq!(sorted(app.rows().await), rows);
    assert_eq!(events_all(&mut app.client.clone(), None, 0).await, events);
}

async fn a_dry_run_reports_the_same_and_writes_nothing(app: TestApp) {
    link_the_existing_mappings(&app).await;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(dir.path(), "in.csv", EVERY_KIND);
    let (dry, real) = (dir.path().join("dry.csv"), dir.path().join("real.csv"));
    let rows = sorted(app.rows().await);
    let events = events_all(&mut app.client.clone(), None, 0).await;

    let run = import_csv(&app.database.url, &csv, &dry, &["--dry-run"]).await;

    assert_eq!(run.code, 1);
    assert_eq!(run.counts(), (12, 2, 2, 8));
    assert_eq!(
        sorted(app.rows().await),
        rows,
        "a dry run writes no mapping"
    );
    assert_eq!(events_all(&mut app.client.clone(), None, 0).await, events);
    let real_run = import_csv(&app.database.url, &csv, &real, &[]).await;
    assert_eq!(real_run.counts(), run.counts());
    // The same rows, for the same reasons; a dry run cannot name a mapping
    // it did not write.
    let reasons = |rows: Vec<(String, String, String, String, String, String)>| {
        rows.into_iter()
            .map(|(line, _, _, reason, _, _)| (line, reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(reasons(report_rows(&dry)), reasons(report_rows(&real)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_needs_no_migrated_database_and_creates_no_table() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = TestDatabase::create(backend).await;
        let dir = tempfile::tempdir().expect("a directory");
        let csv = write_csv(dir.path(), "in.csv", EVERY_KIND);

        let run = import(
            &database.url,
            &["--dry-run", "--csv", csv.to_str().expect("a path")],
        )
        .await;

        assert_eq!(run.code, 1, "{backend:?}: {:?}", run.events);
        // No existing mappings: the `taken` rows are created, the in-input
        // conflicts are still found.
        assert_eq!(run.counts(), (12, 5, 1, 6), "{backend:?}");
        let db = Database::connect(&database.url).await.expect("connects");
        let tables = match backend {
            Backend::Postgres => {
                "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public'"
            }
            Backend::Sqlite => "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table'",
        };
        assert_eq!(
            pg::count(&db, tables).await,
            0,
            "{backend:?}: no table created"
        );
        db.close().await.expect("closes");
    }
}

/// The replaced application's database, with the seed's table:
/// `stripe_customers (user_id, stripe_customer_id)`, plus a time column.
async fn old_application_database(with_time: bool) -> TestDatabase {
    let source = TestDatabase::create(Backend::Postgres).await;
    let db = Database::connect(&source.url).await.expect("connects");
    let time_column = if with_time {
        ", inserted_at timestamp"
    } else {
        ""
    };
    db.execute_unprepared(&format!(
        "CREATE TABLE stripe_customers (user_id TEXT PRIMARY KEY, stripe_customer_id TEXT{time_column})"
    ))
    .await
    .expect("the old table");
    // The race this service ends left two users on one customer.
    let rows = if with_time {
        "('user-1', 'cus_A1', '2019-05-05 10:00:00'), ('user-2', 'cus_A1', '2019-05-04 09:00:00'), \
         ('user-3', 'cus_A3', NULL), ('user-4', NULL, NULL)"
    } else {
        "('user-1', 'cus_A1'), ('user-2', 'cus_A1'), ('user-3', 'cus_A3'), ('user-4', NULL)"
    };
    db.execute_unprepared(&format!("INSERT INTO stripe_customers VALUES {rows}"))
        .await
        .expect("the old rows");
    db.close().await.expect("closes");
    source
}

async fn the_replaced_applications_table_is_read_directly(app: TestApp) {
    let dir = tempfile::tempdir().expect("a directory");
    let report = dir.path().join("report.csv");
    let source = old_application_database(false).await;

    let run = import(
        &app.database.url,
        &[
            "--from-database-url",
            &source.url,
            "--table",
            "stripe_customers",
            "--report",
            report.to_str().expect("a path"),
        ],
    )
    .await;

    assert_eq!(run.code, 1, "{:?}", run.events);
    assert_eq!(run.counts(), (4, 2, 0, 2));
    let rows = read_report(&report);
    assert_eq!(
        rows[0][0], "row",
        "a table's rows are numbered in read order"
    );
    // Without a time, rows are read by user: user-1 wins cus_A1.
    let refused: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|r| (r[1].as_str(), r[3].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            ("user-2", "CONFLICT_IN_INPUT", "user-1"),
            ("user-4", "INVALID_STRIPE_CUSTOMER_ID", "")
        ]
    );
    assert_eq!(
        sorted(app.rows().await),
        [("user-1", "cus_A1"), ("user-3", "cus_A3")].map(|(u, c)| (u.to_owned(), c.to_owned()))
    );

    // With a time column, named: the older mapping wins, and keeps its time.
    let timed = old_application_database(true).await;
    let target = TestDatabase::create(app.backend).await;
    let run = import(
        &target.url,
        &[
            "--from-database-url",
            &timed.url,
            "--table",
            "public.stripe_customers",
            "--created-at-column",
            "inserted_at",
        ],
    )
    .await;
    assert_eq!(run.counts(), (4, 2, 0, 2), "{:?}", run.events);
    let db = Database::connect(&target.url).await.expect("connects");
    let rows = helpers::read_rows(&db).await;
    assert!(
        rows.contains(&("user-2".into(), "cus_A1".into())),
        "{rows:?}"
    );
    let created = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT created_at FROM stripe_customers WHERE user_id = 'user-2'",
        ))
        .await
        .expect("reads")
        .expect("a row")
        .try_get::<chrono::DateTime<chrono::Utc>>("", "created_at")
        .expect("a time");
    assert_eq!(created.to_rfc3339(), "2019-05-04T09:00:00+00:00");
    db.close().await.expect("closes");
}

/// A source table keyed by `id`, whose rows are `(id, user, customer,
/// time)`.
async fn keyed_table(rows: &str) -> TestDatabase {
    let source = TestDatabase::create(Backend::Postgres).await;
    let db = Database::connect(&source.url).await.expect("connects");
    db.execute_unprepared(&format!(
        "CREATE TABLE old (id INT PRIMARY KEY, user_id TEXT, stripe_customer_id TEXT, \
         inserted_at TIMESTAMPTZ); INSERT INTO old VALUES {rows}"
    ))
    .await
    .expect("the old table");
    db.close().await.expect("closes");
    source
}

async fn of_two_contradicting_rows_the_first_in_primary_key_order_wins(app: TestApp) {
    // Without a time, in key order, though `user-b` sorts after `user-a`.
    let source = keyed_table("(1, 'user-b', 'cus_X', NULL), (2, 'user-a', 'cus_X', NULL)").await;
    let args = ["--from-database-url", &source.url, "--table", "old"];
    let run = import(&app.database.url, &args).await;
    assert_eq!(run.counts(), (2, 1, 0, 1), "{:?}", run.events);
    assert_eq!(app.rows().await, [("user-b".into(), "cus_X".into())]);

    // With a time, oldest first, and a tie in key order.
    let target = TestDatabase::create(app.backend).await;
    let source = keyed_table(
        "(1, 'user-d', 'cus_Y', '2020-01-02Z'), (2, 'user-c', 'cus_Y', '2020-01-01Z'), \
         (3, 'user-f', 'cus_Z', '2020-01-01Z'), (4, 'user-e', 'cus_Z', '2020-01-01Z')",
    )
    .await;
    let args = [
        "--from-database-url",
        &source.url,
        "--table",
        "old",
        "--created-at-column",
        "inserted_at",
    ];
    let run = import(&target.url, &args).await;
    assert_eq!(run.counts(), (4, 2, 0, 2), "{:?}", run.events);
    let db = Database::connect(&target.url).await.expect("connects");
    assert_eq!(
        sorted(helpers::read_rows(&db).await),
        [("user-c", "cus_Y"), ("user-f", "cus_Z")].map(|(u, c)| (u.to_owned(), c.to_owned()))
    );
    db.close().await.expect("closes");
}

async fn links_through_the_server_during_an_import_are_arbitrated_by_the_same_constraints(
    app: TestApp,
) {
    const ROWS: usize = 2_000;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = numbered_csv(dir.path(), ROWS);
    let report = dir.path().join("report.csv");
    let report_path = report.clone();
    let url = app.database.url.clone();
    let importing = tokio::spawn(async move {
        import_csv(&url, &csv, &report_path, &["--batch-rows", "100"]).await
    });
    // Meanwhile, callers link every third user to another customer, and
    // every fifth to its own.
    let client = app.client.clone();
    let linked: HashMap<usize, (String, Result<bool, tonic::Code>)> =
        futures::stream::iter((0..ROWS).filter(|i| i % 3 == 0 || i % 5 == 0))
            .map(|i| {
                let mut client = client.clone();
                async move {
                    let customer = if i % 3 == 0 {
                        format!("cus_X{i}")
                    } else {
                        format!("cus_{i}")
                    };
                    let answer = helpers::link(&mut client, &format!("user-{i}"), &customer).await;
                    (
                        i,
                        (customer, answer.map(|r| r.created).map_err(|s| s.code())),
                    )
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let run = importing.await.expect("the import task");

    let table: BTreeMap<String, String> = app.rows().await.into_iter().collect();
    assert_eq!(table.len(), ROWS, "every user ends up linked, once");
    let refused: HashMap<String, (String, String)> = read_report(&report)[1..]
        .iter()
        .map(|r| (r[1].clone(), (r[3].clone(), r[5].clone())))
        .collect();
    let (mut created_by_link, mut created_by_import) = (0, 0);
    for i in 0..ROWS {
        let user = format!("user-{i}");
        let held = &table[&user];
        match linked.get(&i) {
            // The Link's answer is the truth the table shows.
            Some((customer, Ok(created))) => {
                assert_eq!(held, customer, "{user}");
                created_by_link += usize::from(*created);
            }
            Some((customer, Err(code))) => {
                assert_eq!(*code, tonic::Code::AlreadyExists, "{user}");
                assert_ne!(held, customer, "{user}");
            }
            None => {}
        }
        // The import's row was imported exactly when the table holds it,
        // and refused naming the mapping that holds the user otherwise.
        if *held == format!("cus_{i}") {
            assert!(!refused.contains_key(&user), "{user}");
        } else {
            assert_eq!(
                refused.get(&user),
                Some(&("USER_ALREADY_LINKED".to_owned(), held.clone())),
                "{user}"
            );
        }
    }
    let (read, created, present, refused_count) = run.counts();
    created_by_import += created;
    assert_eq!(read, ROWS as u64);
    assert_eq!(refused_count as usize, refused.len());
    assert_eq!(created + present + refused_count, ROWS as u64);
    // One event per creation, whoever made it.
    let events = events_all(&mut app.client.clone(), None, 1000).await;
    assert_eq!(events.len(), created_by_link + created_by_import as usize);
    assert_eq!(
        events.iter().filter(|e| e.caller == "import").count() as u64,
        created
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_mid_way_loses_nothing_reported_as_imported() {
    const ROWS: usize = 1_000;
    let app = helpers::spawn_app(Backend::Postgres).await;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = numbered_csv(dir.path(), ROWS);
    let db = app.db().await;
    // The table locked, the first batch waits inside the database: the
    // interrupt arrives while a batch is in flight.
    let lock = pg::lock_table(&db).await;
    let csv_arg = csv.display().to_string();
    let url = app.database.url.clone();
    let mut process = tokio::task::spawn_blocking(move || {
        ImportProcess::start(
            &url,
            &["--csv", &csv_arg, "--batch-rows", "100"],
            "info,customer_mapping::import=debug",
        )
    })
    .await
    .expect("started");
    let watcher = Database::connect(&app.database.url)
        .await
        .expect("connects");
    pg::wait_until_sessions_wait_on_a_lock(&watcher, 1).await;
    process.signal("-INT");
    let mut process = tokio::task::spawn_blocking(move || {
        process.wait_for(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("interrupted"))
        });
        process
    })
    .await
    .expect("the interrupt was seen");
    lock.commit().await.expect("unlock");
    let run = tokio::task::spawn_blocking(move || {
        process.wait_for(|e| e["level"] == "WARN" && e["created"].is_u64());
        process.finish()
    })
    .await
    .expect("finished");

    assert_eq!(run.code, 130, "{:?}", run.events);
    let (read, created, _, _) = run.counts();
    assert_eq!(
        created, 100,
        "the batch in flight finished, and no other began"
    );
    assert_eq!(read, 100);
    assert_eq!(pg::rows_in_table(&db).await, 100);
    assert_eq!(
        pg::count(&db, "SELECT count(*) AS n FROM mapping_events").await,
        100
    );

    let again = import(&app.database.url, &["--csv", &csv.display().to_string()]).await;
    assert_eq!(again.code, 0, "{:?}", again.events);
    assert_eq!(
        again.counts(),
        (ROWS as u64, ROWS as u64 - 100, 100, 0),
        "the second run continues where the first stopped"
    );
    assert_eq!(pg::rows_in_table(&db).await, ROWS as i64);
    db.close().await.expect("closes");
    watcher.close().await.expect("closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_unreadable_sources_exit_2_with_one_line() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let dir = tempfile::tempdir().expect("a directory");
    let wrong_header = write_csv(dir.path(), "h.csv", "user,customer\nu,cus_1\n");
    let empty = write_csv(dir.path(), "e.csv", "");
    let good = write_csv(dir.path(), "g.csv", "user_id,stripe_customer_id\nu,cus_1\n");
    let (wrong_header, empty, good) = (
        wrong_header.display().to_string(),
        empty.display().to_string(),
        good.display().to_string(),
    );
    let missing = dir.path().join("missing.csv").display().to_string();
    let unwritable = dir.path().join("no/such/dir/r.csv").display().to_string();
    let cases: [(&[&str], &str); 11] = [
        (&[], "--csv"),
        (&["--csv", &missing], "cannot read the CSV file"),
        (&["--csv", &wrong_header], "unexpected column \\\"user\\\""),
        (&["--csv", &empty], "it is empty"),
        (&["--csv", &good, "--table", "t"], "--table"),
        (
            &[
                "--csv",
                &good,
                "--from-database-url",
                "postgres://h/d",
                "--table",
                "t",
            ],
            "cannot be used with",
        ),
        (
            &["--from-database-url", "mysql://h/d", "--table", "t"],
            "postgres://",
        ),
        (
            &["--csv", &good, "--report", &unwritable],
            "cannot write the report",
        ),
        (
            &["--csv", &good, "--account-column", "account"],
            "(--account-column)",
        ),
        (
            &["--csv", &good, "--account-column", "user_id"],
            "holds another field",
        ),
        (
            &[
                "--csv",
                &good,
                "--account-column",
                "account",
                "--stripe-account",
                "acct_1",
            ],
            "cannot be used with",
        ),
    ];
    for (args, says) in cases {
        let output = Command::new(BINARY)
            .arg("import")
            .args(args)
            .env("DATABASE_URL", &database.url)
            .env("LOG_FORMAT", "json")
            .env_remove("IMPORT_FROM_DATABASE_URL")
            .output()
            .expect("the binary runs");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {printed}");
        let lines: Vec<&str> = printed
            .lines()
            .filter(|l| l.contains("ERROR") || l.starts_with("customer-mapping:"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line in {printed}");
        assert!(lines[0].contains(says), "{args:?}: {}", lines[0]);
    }
    // Nothing was written: not even the schema.
    let db = Database::connect(&database.url).await.expect("connects");
    assert_eq!(
        pg::count(
            &db,
            "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'stripe_customers'"
        )
        .await,
        0
    );
    db.close().await.expect("closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_import_needs_a_named_target_and_names_it() {
    let dir = tempfile::tempdir().expect("a directory");
    let csv = write_csv(
        dir.path(),
        "in.csv",
        "user_id,stripe_customer_id\nu,cus_1\n",
    );
    let output = Command::new(BINARY)
        .current_dir(dir.path())
        .args(["import", "--csv", &csv.display().to_string()])
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_URL_FILE")
        .output()
        .expect("the binary runs");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{printed}");
    let lines: Vec<&str> = printed.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {printed}");
    assert!(lines[0].contains("set DATABASE_URL"), "{printed}");
    assert!(
        !dir.path().join("customer-mapping.db").exists(),
        "the default database was not created"
    );

    // Named, it is the first thing the import says.
    let database = TestDatabase::create(Backend::Sqlite).await;
    let run = import(&database.url, &["--csv", &csv.display().to_string()]).await;
    assert_eq!(run.code, 0, "{:?}", run.events);
    assert_eq!(
        run.events[0]["database"],
        customer_mapping::config::redact_url(&database.url),
        "{:?}",
        run.events
    );
}

//! Where an import's rows come from: a CSV file, or the replaced
//! application's own PostgreSQL table. Each source is checked when opened
//! (header, table, columns), so a wrong argument fails before anything is
//! written; then it is read in chunks on its own task, each row validated
//! as Link validates its request.

use std::{
    fs::File,
    io::BufReader,
    path::PathBuf,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::sqlx::{self, ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{Reason, Refusal, Row, Valid, progress::Position};
use crate::{
    config::ImportArgs,
    mapping::{InvalidId, StripeAccount, StripeCustomerId, UserId},
};

/// How long connecting to the source database may take.
const SOURCE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may take to count its rows, or to send the next one.
const SOURCE_READ_TIMEOUT: Duration = Duration::from_secs(60);

const USER_ID: &str = "user_id";
const STRIPE_CUSTOMER_ID: &str = "stripe_customer_id";
const CREATED_AT: &str = "created_at";

/// A chunk of rows, or why the source could not be read further.
pub type Chunk = Result<Vec<Row>, String>;

pub struct Source {
    kind: Kind,
    /// The account of a row without a column naming one (`--stripe-account`).
    every_account: StripeAccount,
    position: Arc<Position>,
}

enum Kind {
    Csv {
        path: PathBuf,
        reader: csv::Reader<BufReader<File>>,
        columns: CsvColumns,
    },
    Table {
        name: String,
        conn: PgConnection,
        select: String,
        /// Whether the select reads an account column.
        has_account: bool,
    },
}

/// Where each field is in a CSV record.
struct CsvColumns {
    user_id: usize,
    stripe_customer_id: usize,
    stripe_account: Option<usize>,
    created_at: Option<usize>,
    count: usize,
}

impl Source {
    /// Opens and checks the source; the error is one line for the operator.
    pub async fn open(args: &ImportArgs) -> Result<Self, String> {
        let position = Arc::new(Position::default());
        if let Some(column) = &args.account_column {
            let others = [USER_ID, STRIPE_CUSTOMER_ID, CREATED_AT]
                .into_iter()
                .chain([args.user_column.as_str(), args.customer_column.as_str()])
                .chain(args.created_at_column.as_deref());
            if others.into_iter().any(|other| other == column) {
                return Err(format!(
                    "--account-column {column} names a column that holds another field"
                ));
            }
        }
        let kind = match (&args.csv, &args.from_database_url, &args.table) {
            (Some(_), _, Some(_)) => {
                return Err(
                    "--table names a table of --from-database-url; give it or --csv".into(),
                );
            }
            (Some(path), _, _) => {
                open_csv(path.clone(), args.account_column.as_deref(), &position)?
            }
            (None, Some(url), Some(table)) => {
                open_table(url.expose_secret(), table, args, &position).await?
            }
            // clap requires a source, and a table with a database URL.
            _ => return Err("give --csv PATH, or --from-database-url URL --table NAME".into()),
        };
        Ok(Self {
            kind,
            every_account: args.stripe_account.clone(),
            position,
        })
    }

    /// What the report's first column is called.
    pub fn position_name(&self) -> &'static str {
        match self.kind {
            Kind::Csv { .. } => "line",
            Kind::Table { .. } => "row",
        }
    }

    /// The source, for the log (never a URL: it may hold a password).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Csv { path, .. } => format!("CSV file {}", path.display()),
            Kind::Table { name, .. } => format!("table {name} of the source database"),
        }
    }

    pub fn position(&self) -> Arc<Position> {
        self.position.clone()
    }

    /// Reads every row on a task of its own, sending chunks of up to
    /// `rows` rows; stops when the receiver is gone.
    pub fn spawn(self, rows: usize, tx: mpsc::Sender<Chunk>) -> tokio::task::JoinHandle<()> {
        let (position, every) = (self.position, self.every_account);
        match self.kind {
            Kind::Csv {
                reader, columns, ..
            } => tokio::task::spawn_blocking(move || {
                read_csv(reader, &columns, &every, rows, &tx, &position)
            }),
            Kind::Table {
                conn,
                select,
                has_account,
                ..
            } => {
                let every = (!has_account).then_some(every);
                tokio::spawn(read_table(conn, select, every, rows, tx, position))
            }
        }
    }
}

fn open_csv(
    path: PathBuf,
    account_column: Option<&str>,
    position: &Position,
) -> Result<Kind, String> {
    let cannot = |why: String| format!("cannot read the CSV file {}: {why}", path.display());
    let file = File::open(&path).map_err(|e| cannot(e.to_string()))?;
    let total = file.metadata().map_err(|e| cannot(e.to_string()))?.len();
    position.total.store(total, Relaxed);
    let mut reader = csv::ReaderBuilder::new()
        // A row with too few or too many fields is refused, not fatal.
        .flexible(true)
        .from_reader(BufReader::with_capacity(256 * 1024, file));
    let header = reader.headers().map_err(|e| cannot(e.to_string()))?.clone();
    let expected = match account_column {
        Some(account) => format!(
            "expected the header user_id,stripe_customer_id,{account} and optionally created_at"
        ),
        None => "expected the header user_id,stripe_customer_id and optionally created_at \
                 (and with --account-column, a column of Stripe accounts)"
            .to_owned(),
    };
    if header.is_empty() || header.iter().all(str::is_empty) {
        return Err(cannot(format!("it is empty; {expected}")));
    }
    let (mut user_id, mut stripe_customer_id, mut created_at) = (None, None, None);
    let mut stripe_account = None;
    for (i, name) in header.iter().enumerate() {
        let slot = match name.trim_start_matches('\u{feff}').trim() {
            USER_ID => &mut user_id,
            STRIPE_CUSTOMER_ID => &mut stripe_customer_id,
            CREATED_AT => &mut created_at,
            other if Some(other) == account_column => &mut stripe_account,
            other => return Err(cannot(format!("unexpected column \"{other}\"; {expected}"))),
        };
        if slot.replace(i).is_some() {
            return Err(cannot(format!("the column \"{name}\" appears twice")));
        }
    }
    let (Some(user_id), Some(stripe_customer_id)) = (user_id, stripe_customer_id) else {
        return Err(cannot(format!(
            "no user_id or stripe_customer_id column; {expected}"
        )));
    };
    if let (Some(account), None) = (account_column, stripe_account) {
        return Err(cannot(format!(
            "no column \"{account}\" (--account-column); {expected}"
        )));
    }
    Ok(Kind::Csv {
        path,
        reader,
        columns: CsvColumns {
            user_id,
            stripe_customer_id,
            stripe_account,
            created_at,
            count: header.len(),
        },
    })
}

fn read_csv(
    mut reader: csv::Reader<BufReader<File>>,
    columns: &CsvColumns,
    every_account: &StripeAccount,
    rows: usize,
    tx: &mpsc::Sender<Chunk>,
    position: &Position,
) {
    let mut record = csv::ByteRecord::new();
    let mut chunk = Vec::with_capacity(rows);
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                let at = err.position().map_or(0, csv::Position::line);
                let why = format!("the CSV file became unreadable at line {at}: {err}");
                let _ = tx.blocking_send(Ok(std::mem::take(&mut chunk)));
                let _ = tx.blocking_send(Err(why));
                return;
            }
        }
        let at = record.position().map_or(0, csv::Position::line);
        let field = |i: usize| record.get(i).map(text).unwrap_or_default();
        let row = if record.len() != columns.count {
            Row::Refused(Refusal {
                at,
                user_id: field(columns.user_id).into_text(),
                stripe_customer_id: field(columns.stripe_customer_id).into_text(),
                stripe_account: columns
                    .stripe_account
                    .map_or_else(|| every_account.to_string(), |i| field(i).into_text()),
                reason: Reason::MalformedRow,
                existing: None,
                detail: format!(
                    "has {} of the header's {} fields",
                    record.len(),
                    columns.count
                ),
            })
        } else {
            let created_at = match columns.created_at.map(field) {
                None | Some(Text::Missing) => Ok(None),
                Some(Text::Utf8(s)) if s.is_empty() => Ok(None),
                Some(Text::Utf8(s)) => DateTime::parse_from_rfc3339(&s)
                    .map(|t| Some(t.with_timezone(&Utc)))
                    .map_err(|e| format!("not an RFC 3339 time ({e}): {s:?}")),
                Some(Text::NotUtf8(s)) => Err(format!("not UTF-8: {s:?}")),
            };
            check(
                at,
                field(columns.user_id),
                field(columns.stripe_customer_id),
                account(every_account, columns.stripe_account.map(field)),
                created_at,
            )
        };
        chunk.push(row);
        if chunk.len() >= rows {
            position
                .done
                .store(record.position().map_or(0, csv::Position::byte), Relaxed);
            if tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                return;
            }
            chunk.reserve(rows);
        }
    }
    position.done.store(position.total.load(Relaxed), Relaxed);
    let _ = tx.blocking_send(Ok(chunk));
}

/// A field as read: UTF-8 or not (then shown lossily, and refused).
#[derive(Debug, Default)]
enum Text {
    Utf8(String),
    NotUtf8(String),
    #[default]
    Missing,
}

impl Text {
    fn into_text(self) -> String {
        match self {
            Text::Utf8(s) | Text::NotUtf8(s) => s,
            Text::Missing => String::new(),
        }
    }
}

fn text(bytes: &[u8]) -> Text {
    match std::str::from_utf8(bytes) {
        Ok(s) => Text::Utf8(s.to_owned()),
        Err(_) => Text::NotUtf8(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// A row's account: the column's value when the source has one (empty
/// or NULL: the platform's own account), otherwise `every`.
fn account(every: &StripeAccount, read: Option<Text>) -> Result<StripeAccount, (String, String)> {
    match read {
        None => Ok(every.clone()),
        Some(Text::Missing) => Ok(StripeAccount::platform()),
        Some(text) => parsed(text, StripeAccount::parse),
    }
}

/// A field parsed as an id; when it is not one, the field as read and why.
fn parsed<T>(text: Text, parse: fn(String) -> Result<T, InvalidId>) -> Result<T, (String, String)> {
    match text {
        Text::Utf8(s) => parse(s.clone()).map_err(|e| (s, e.to_string())),
        Text::NotUtf8(s) => Err((s, "must be UTF-8".to_owned())),
        Text::Missing => Err((String::new(), "is missing (NULL)".to_owned())),
    }
}

/// Link's validation of one row; a refusal names the first invalid field.
fn check(
    at: u64,
    user_id: Text,
    stripe_customer_id: Text,
    stripe_account: Result<StripeAccount, (String, String)>,
    created_at: Result<Option<DateTime<Utc>>, String>,
) -> Row {
    let refuse = |reason, detail, user_id, stripe_customer_id, stripe_account| {
        Row::Refused(Refusal {
            at,
            user_id,
            stripe_customer_id,
            stripe_account,
            reason,
            existing: None,
            detail,
        })
    };
    let user = parsed(user_id, UserId::parse);
    let customer = parsed(stripe_customer_id, StripeCustomerId::parse);
    match (user, customer, stripe_account, created_at) {
        (Ok(user_id), Ok(stripe_customer_id), Ok(stripe_account), Ok(created_at)) => {
            Row::Valid(Valid {
                at,
                user_id,
                stripe_customer_id,
                stripe_account,
                // PostgreSQL keeps microseconds.
                created_at: created_at.map(|t| t.trunc_subsecs(6)),
            })
        }
        (Err((user, why)), customer, account, _) => refuse(
            Reason::InvalidUserId,
            format!("user_id {why}"),
            user,
            shown(customer),
            shown(account),
        ),
        (Ok(user), Err((customer, why)), account, _) => refuse(
            Reason::InvalidStripeCustomerId,
            format!("stripe_customer_id {why}"),
            user.into(),
            customer,
            shown(account),
        ),
        (Ok(user), Ok(customer), Err((account, why)), _) => refuse(
            Reason::InvalidStripeAccount,
            format!("the Stripe account {why}"),
            user.into(),
            customer.into(),
            account,
        ),
        (Ok(user), Ok(customer), Ok(account), Err(why)) => refuse(
            Reason::InvalidCreatedAt,
            format!("created_at is {why}"),
            user.into(),
            customer.into(),
            account.into(),
        ),
    }
}

/// A field as read, valid or not.
fn shown<T: Into<String>>(field: Result<T, (String, String)>) -> String {
    field.map_or_else(|(read, _)| read, Into::into)
}

async fn open_table(
    url: &str,
    table: &str,
    args: &ImportArgs,
    position: &Position,
) -> Result<Kind, String> {
    let mut conn = connect_for_one_snapshot(url).await?;
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    };
    let columns = table_columns(&mut conn, schema, name).await?;
    if columns.is_empty() {
        return Err(format!(
            "the source database has no table {table} (or this user may not read it)"
        ));
    }
    check_columns(table, &columns, args)?;
    let created_at = args.created_at_column.clone().or_else(|| {
        columns
            .iter()
            .any(|c| c == CREATED_AT)
            .then(|| CREATED_AT.to_owned())
    });
    let primary_key = primary_key(&mut conn, schema, name).await?;
    let quoted = quote_table(schema, name);
    let select = select_rows(&quoted, args, created_at.as_deref(), &primary_key);
    let count = count_rows(&mut conn, &quoted).await?;
    position.total.store(count, Relaxed);
    Ok(Kind::Table {
        name: table.to_owned(),
        conn,
        select,
        has_account: args.account_column.is_some(),
    })
}

/// `work` on the source database, bounded in time; the error is one line
/// saying what was being done.
async fn bounded<T>(
    what: &str,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, String> {
    let failed =
        |err: &dyn std::fmt::Display| format!("cannot read the source database ({what}): {err}");
    tokio::time::timeout(SOURCE_READ_TIMEOUT, work)
        .await
        .map_err(|_| failed(&"no answer in time"))?
        .map_err(|e| failed(&e))
}

/// A connection inside a read-only transaction, so that the count and the
/// rows come from one snapshot; timestamps without a time zone are read as
/// UTC.
async fn connect_for_one_snapshot(url: &str) -> Result<PgConnection, String> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|_| "--from-database-url is not a PostgreSQL connection URL".to_owned())?;
    let options = options.disable_statement_logging();
    let mut conn = tokio::time::timeout(SOURCE_CONNECT_TIMEOUT, options.connect())
        .await
        .map_err(|_| "cannot read the source database (connecting): no answer in time".to_owned())?
        .map_err(|e| format!("cannot read the source database (connecting): {e}"))?;
    for setup in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        "SET LOCAL TIME ZONE 'UTC'",
    ] {
        let statement = sqlx::raw_sql(sqlx::AssertSqlSafe(setup)).execute(&mut conn);
        bounded("starting a read", statement).await?;
    }
    Ok(conn)
}

/// The table's columns, in their order; none when there is no such table
/// (or this user may not see it).
async fn table_columns(
    conn: &mut PgConnection,
    schema: Option<&str>,
    name: &str,
) -> Result<Vec<String>, String> {
    let query = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = COALESCE($1, current_schema()) AND table_name = $2 \
         ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(conn);
    let columns: Vec<(String,)> = bounded("reading the table's columns", query).await?;
    Ok(columns.into_iter().map(|(c,)| c).collect())
}

/// The columns of the table's primary key, in the key's order; none when
/// it has none. Read from the catalog, which any user may read (the
/// information schema shows constraints only to a table's writers).
async fn primary_key(
    conn: &mut PgConnection,
    schema: Option<&str>,
    name: &str,
) -> Result<Vec<String>, String> {
    let query = sqlx::query_as(
        "SELECT a.attname::text FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey) \
         WHERE i.indisprimary AND n.nspname = COALESCE($1, current_schema()) \
         AND c.relname = $2 \
         ORDER BY array_position(i.indkey, a.attnum)",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(conn);
    let columns: Vec<(String,)> = bounded("reading the table's primary key", query).await?;
    Ok(columns.into_iter().map(|(c,)| c).collect())
}

/// Every column the arguments name must be one of the table's.
fn check_columns(table: &str, columns: &[String], args: &ImportArgs) -> Result<(), String> {
    let named = [
        ("--user-column", args.user_column.as_str()),
        ("--customer-column", args.customer_column.as_str()),
    ]
    .into_iter()
    .chain(
        args.created_at_column
            .as_deref()
            .map(|c| ("--created-at-column", c)),
    )
    .chain(
        args.account_column
            .as_deref()
            .map(|c| ("--account-column", c)),
    );
    for (flag, column) in named {
        if !columns.iter().any(|have| have == column) {
            return Err(format!(
                "the table {table} has no column \"{column}\" ({flag}); its columns are {}",
                columns.join(", ")
            ));
        }
    }
    Ok(())
}

/// The query that reads the rows, in the order that decides which of two
/// contradicting rows is imported (the first read): oldest first when the
/// table says when, then in the order the rows were keyed in (the primary
/// key); a table with neither, by its ids (`--help` and the README say so).
fn select_rows(
    quoted: &str,
    args: &ImportArgs,
    created_at: Option<&str>,
    primary_key: &[String],
) -> String {
    let (user, customer) = (quote(&args.user_column), quote(&args.customer_column));
    let account = args
        .account_column
        .as_deref()
        .map_or_else(|| "NULL".to_owned(), quote);
    let created = created_at.map_or_else(|| "NULL".to_owned(), quote);
    let ties: Vec<String> = match primary_key {
        [] => vec![user.clone(), customer.clone()],
        key => key.iter().map(|column| quote(column)).collect(),
    };
    let order: Vec<String> = created_at
        .map(|_| format!("{created} NULLS LAST"))
        .into_iter()
        .chain(ties)
        .collect();
    format!(
        "SELECT {user}::text, {customer}::text, {account}::text, {created}::timestamptz \
         FROM {quoted} \
         ORDER BY {}",
        order.join(", ")
    )
}

async fn count_rows(conn: &mut PgConnection, quoted: &str) -> Result<u64, String> {
    let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {quoted}"
    )))
    .fetch_one(conn);
    let (count,): (i64,) = bounded("counting the rows", query).await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// An identifier, quoted for PostgreSQL: whatever the operator typed is a
/// name, never SQL.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn quote_table(schema: Option<&str>, name: &str) -> String {
    match schema {
        Some(schema) => format!("{}.{}", quote(schema), quote(name)),
        None => quote(name),
    }
}

/// Reads the rows `select` selects; `every` is the account of every row
/// when the table has no account column.
async fn read_table(
    mut conn: PgConnection,
    select: String,
    every: Option<StripeAccount>,
    rows: usize,
    tx: mpsc::Sender<Chunk>,
    position: Arc<Position>,
) {
    type SourceRow = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<DateTime<Utc>>,
    );
    let mut n: u64 = 0;
    let mut chunk = Vec::with_capacity(rows);
    let mut stream = sqlx::query_as::<_, SourceRow>(sqlx::AssertSqlSafe(select)).fetch(&mut conn);
    loop {
        let failed = match tokio::time::timeout(SOURCE_READ_TIMEOUT, stream.next()).await {
            Ok(next) => match next.transpose() {
                Ok(next) => Ok(next),
                Err(err) => Err(format!("cannot read the source table: {err}")),
            },
            Err(_) => Err("the source database stopped answering".to_owned()),
        };
        let next = match failed {
            Ok(next) => next,
            Err(why) => {
                // Rows read before the failure are imported.
                let _ = tx.send(Ok(std::mem::take(&mut chunk))).await;
                let _ = tx.send(Err(why)).await;
                return;
            }
        };
        let Some((user_id, stripe_customer_id, stripe_account, created_at)) = next else {
            break;
        };
        n += 1;
        let text = |v: Option<String>| v.map_or(Text::Missing, Text::Utf8);
        let stripe_account = match &every {
            Some(every) => Ok(every.clone()),
            None => account(&StripeAccount::platform(), Some(text(stripe_account))),
        };
        chunk.push(check(
            n,
            text(user_id),
            text(stripe_customer_id),
            stripe_account,
            Ok(created_at),
        ));
        if chunk.len() >= rows {
            position.done.store(n, Relaxed);
            if tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
                return;
            }
            chunk.reserve(rows);
        }
    }
    drop(stream);
    position
        .done
        .store(position.total.load(Relaxed).max(n), Relaxed);
    let _ = tx.send(Ok(chunk)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
}

//! `customer-mapping import`: brings the mappings of the application this
//! service replaces in, with exactly Link's rules, and reports every row it
//! refuses.
//!
//! The rows stream through: a reader (`source.rs`) parses and validates
//! them on its own thread while the previous batch is in the database, and
//! only a few batches are ever in memory. Batches are applied one after the
//! other, in input order, so "an earlier row of the same input" means what
//! it says; within a batch no two rows share a user or a customer in one
//! account (a row that would starts the next batch), so one statement decides a whole
//! batch (`store::import`).
//!
//! What the import remembers of the rows it has accepted is their
//! fingerprints (`index.rs`, 64-bit hashes): enough to tell a row that
//! contradicts an earlier row of the input (`CONFLICT_IN_INPUT`) from one
//! that contradicts the database as it was (`USER_ALREADY_LINKED`, ...),
//! and, in a dry run, to find the first kind without writing. The
//! database, not the fingerprints, decides every row that is written.

mod index;
mod progress;
mod report;
mod source;

use std::{process::ExitCode, sync::Arc, time::Duration};

use chrono::{DateTime, SubsecRound, Utc};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ImportArgs, Settings},
    mapping::{
        Actor, KeySet, LinkAttempt, LinkKeys, LinkOutcome, LinkToken, LinkWrite, Mapping,
        StripeAccount, StripeCustomerId, UserId,
    },
    store::{Database, Migrations},
};
use index::InputIndex;
use progress::Counters;
use report::Report;
use source::Source;

/// The caller the audit trail names for every mapping an import creates.
pub const IMPORT_CALLER: &str = "import";

/// How long one batch may take in the database before its connection is
/// given up (and the batch tried again). A batch of 5,000 rows takes a few
/// hundred milliseconds; this only bounds a database gone silent.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts per batch: after a lost answer, an abort by the database, or a
/// row that conflicted with a change committed during the statement.
const MAX_BATCH_ATTEMPTS: usize = 5;

/// Exit statuses (also in the README and in `--help`).
const EXIT_REFUSED: u8 = 1;
const EXIT_BAD_SOURCE: u8 = 2;
const EXIT_TARGET_FAILED: u8 = 3;
const EXIT_INTERRUPTED: u8 = 130;

/// Why a row was not imported: the report's `reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidUserId,
    InvalidStripeCustomerId,
    InvalidStripeAccount,
    InvalidCreatedAt,
    /// A CSV line with a number of fields other than the header's.
    MalformedRow,
    UserAlreadyLinked,
    CustomerAlreadyLinked,
    ConflictInInput,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidUserId => "INVALID_USER_ID",
            Reason::InvalidStripeCustomerId => "INVALID_STRIPE_CUSTOMER_ID",
            Reason::InvalidStripeAccount => "INVALID_STRIPE_ACCOUNT",
            Reason::InvalidCreatedAt => "INVALID_CREATED_AT",
            Reason::MalformedRow => "MALFORMED_ROW",
            Reason::UserAlreadyLinked => "USER_ALREADY_LINKED",
            Reason::CustomerAlreadyLinked => "CUSTOMER_ALREADY_LINKED",
            Reason::ConflictInInput => "CONFLICT_IN_INPUT",
        }
    }
}

/// A row that was not imported, as the report shows it.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The CSV line, or the row's position in the table's read order.
    pub at: u64,
    pub user_id: String,
    pub stripe_customer_id: String,
    pub stripe_account: String,
    pub reason: Reason,
    /// The mapping holding the user or the customer (in the row's account),
    /// when there is one.
    pub existing: Option<(String, String)>,
    pub detail: String,
}

/// A row whose ids are valid: what Link would be called with.
#[derive(Debug, Clone)]
pub struct Valid {
    pub at: u64,
    pub user_id: UserId,
    pub stripe_customer_id: StripeCustomerId,
    pub stripe_account: StripeAccount,
    /// The source's own time of creation; the import's time when it has
    /// none.
    pub created_at: Option<DateTime<Utc>>,
}

/// A row as the reader hands it over.
#[derive(Debug, Clone)]
pub enum Row {
    Valid(Valid),
    Refused(Refusal),
}

/// What ended an import early.
#[derive(Debug)]
enum Failure {
    /// The source can't be read (exit 2).
    Source(String),
    /// The target database failed (exit 3).
    Target(String),
}

/// Runs an import and returns the process's exit status. Every outcome is
/// logged: one summary line, or one error line saying what is wrong.
pub async fn run(settings: &Settings, args: &ImportArgs) -> ExitCode {
    let interrupted = CancellationToken::new();
    tokio::spawn(watch_for_interrupts(
        crate::shutdown::shutdown_signal(),
        interrupted.clone(),
    ));
    let (mut import, source) = match Import::start(settings, args).await {
        Ok(started) => started,
        Err(failure) => return fail(failure),
    };
    let ended = import.go(source, &interrupted).await;
    import.finish(ended, interrupted.is_cancelled())
}

/// The first SIGINT or SIGTERM ends the import after the batch in flight;
/// a second one ends the process at once (nothing reported as imported is
/// lost either way: a batch counts only once committed).
async fn watch_for_interrupts(first: impl Future<Output = ()>, interrupted: CancellationToken) {
    first.await;
    interrupted.cancel();
    tracing::warn!("interrupted: stopping after the batch in flight (interrupt again to stop now)");
    crate::shutdown::shutdown_signal().await;
    tracing::warn!("interrupted again: stopping now");
    std::process::exit(i32::from(EXIT_INTERRUPTED));
}

impl Failure {
    /// The exit status it ends the process with, and its message.
    fn into_exit(self) -> (u8, String) {
        match self {
            Failure::Source(message) => (EXIT_BAD_SOURCE, message),
            Failure::Target(message) => (EXIT_TARGET_FAILED, message),
        }
    }
}

/// A failure before the first row: one line, nothing written.
fn fail(failure: Failure) -> ExitCode {
    let (status, message) = failure.into_exit();
    tracing::error!(error = message, "import failed; nothing was imported");
    ExitCode::from(status)
}

struct Import {
    db: Database,
    /// A dry run's target without the service's tables.
    target_is_empty: bool,
    report: Report,
    index: InputIndex,
    counters: Arc<Counters>,
    batch_rows: usize,
    dry_run: bool,
    /// This run's name in the audit trail (`request_id` of its events).
    run_id: String,
    started: Instant,
}

/// Refuses to import into a connected account before the upgrade's last
/// step, as Link does: a previous release may still serve the database.
async fn require_accounts(db: &Database, timeout: std::time::Duration) -> Result<(), Failure> {
    let enabled = db
        .accounts_enabled(Instant::now() + timeout)
        .await
        .map_err(|err| Failure::Target(format!("cannot read the target database: {err}")))?;
    if enabled {
        return Ok(());
    }
    Err(Failure::Target(
        "mappings of connected Stripe accounts are not enabled on the target yet: once no \
         replica of the previous release serves it, run `customer-mapping migrate \
         --enable-stripe-accounts`"
            .to_owned(),
    ))
}

impl Import {
    /// Opens the source, the report and the target; any of them failing
    /// ends the import before it reads a row.
    async fn start(settings: &Settings, args: &ImportArgs) -> Result<(Self, Source), Failure> {
        let source = Source::open(args).await.map_err(Failure::Source)?;
        let report = Report::create(
            args.report.as_deref(),
            source.position_name(),
            args.account_column.is_some(),
        )
        .map_err(Failure::Source)?;
        let database = &settings.database;
        // A dry run writes nothing, not even the schema.
        let migrations = if args.dry_run {
            Migrations::Leave
        } else {
            Migrations::Apply
        };
        let db = Database::open(database, migrations)
            .await
            .map_err(|failure| Failure::Target(format!("cannot use the target: {failure}")))?;
        // A dry run against a database not migrated yet (the first step of
        // an adoption) finds no mapping there.
        let target_is_empty = args.dry_run
            && !db
                .schema_is_ready(database.database_connect_timeout)
                .await
                .map_err(|err| {
                    Failure::Target(format!("cannot read the target database: {err}"))
                })?;
        if target_is_empty {
            tracing::info!(
                "the target database has no mappings table yet: the dry run treats it as empty"
            );
        } else if args.account_column.is_some() || !args.stripe_account.is_platform() {
            require_accounts(&db, database.database_connect_timeout).await?;
        }
        let import = Self {
            db,
            target_is_empty,
            report,
            index: InputIndex::new(args.dry_run),
            counters: Arc::new(Counters::default()),
            batch_rows: args.batch_rows,
            dry_run: args.dry_run,
            run_id: format!("import-{}", uuid::Uuid::new_v4().simple()),
            started: Instant::now(),
        };
        Ok((import, source))
    }

    /// Reads, batches and applies every row, until the end of the source,
    /// an interrupt, or a failure.
    async fn go(&mut self, source: Source, interrupted: &CancellationToken) -> Result<(), Failure> {
        tracing::info!(
            source = %source.describe(),
            run = %self.run_id,
            dry_run = self.dry_run,
            "import started"
        );
        let (tx, mut rx) = mpsc::channel(2);
        let position = source.position();
        let reader = source.spawn(self.batch_rows, tx);
        let _progress = progress::spawn(self.counters.clone(), position, self.started);
        let mut batch = Batch::default();
        let ended = loop {
            let chunk = tokio::select! {
                biased;
                () = interrupted.cancelled() => break Ok(()),
                chunk = rx.recv() => chunk,
            };
            let rows = match chunk {
                None => break self.apply(std::mem::take(&mut batch)).await,
                Some(Err(message)) => {
                    // Rows read before the unreadable part are imported.
                    break self
                        .apply(std::mem::take(&mut batch))
                        .await
                        .and(Err(Failure::Source(message)));
                }
                Some(Ok(rows)) => rows,
            };
            if let Err(failure) = self.take(rows, &mut batch, interrupted).await {
                break Err(failure);
            }
        };
        drop(rx);
        reader.abort();
        ended
    }

    /// Sorts a chunk of rows into batches, applying each batch as it fills.
    async fn take(
        &mut self,
        rows: Vec<Row>,
        batch: &mut Batch,
        interrupted: &CancellationToken,
    ) -> Result<(), Failure> {
        for row in rows {
            match row {
                Row::Refused(refusal) => batch.refused.push(refusal),
                Row::Valid(row) => {
                    let keys = self.index.keys(&row);
                    if !batch.admits(keys) {
                        self.apply(std::mem::take(batch)).await?;
                    }
                    batch.push(row, keys);
                    if batch.rows.len() >= self.batch_rows {
                        self.apply(std::mem::take(batch)).await?;
                    }
                }
            }
            if interrupted.is_cancelled() && batch.rows.is_empty() {
                break;
            }
        }
        // A chunk's last refusals wait for no valid row.
        if batch.rows.is_empty() {
            self.apply(std::mem::take(batch)).await?;
        }
        Ok(())
    }

    /// Counts and reports refused rows, in input order.
    fn refuse(&mut self, mut refusals: Vec<Refusal>) -> Result<(), Failure> {
        refusals.sort_by_key(|refusal| refusal.at);
        self.counters.refused(refusals.len() as u64);
        for refusal in &refusals {
            self.report.write(refusal).map_err(Failure::Source)?;
        }
        self.report.flush().map_err(Failure::Source)
    }

    /// Applies one batch, running again the rows whose answer is not known
    /// yet, and reports and counts each row once it is decided.
    async fn apply(&mut self, batch: Batch) -> Result<(), Failure> {
        let mut refused = batch.refused;
        // Counted when decided, so the summary of an interrupted import
        // counts only rows it decided.
        self.counters
            .read((batch.rows.len() + refused.len()) as u64);
        if batch.rows.is_empty() {
            return self.refuse(refused);
        }
        let rows = self.writes(batch.rows);
        let mut todo: Vec<&(u64, LinkWrite)> = rows.iter().collect();
        for _ in 0..MAX_BATCH_ATTEMPTS {
            let attempts = self.attempt(&todo).await?;
            let mut again = Vec::new();
            for (row, attempt) in todo.into_iter().zip(attempts) {
                let outcome = match Outcome::decided(attempt.outcome(&row.1)) {
                    Some(outcome) => outcome,
                    None if self.dry_run => self.index.without_holder(&row.1.mapping),
                    None => {
                        again.push(row);
                        continue;
                    }
                };
                refused.extend(self.record(row, outcome));
            }
            if again.is_empty() {
                self.refuse(refused)?;
                let counts = self.counters.snapshot();
                tracing::debug!(
                    created = counts.created,
                    present = counts.present,
                    refused = counts.refused,
                    "batch committed"
                );
                return Ok(());
            }
            todo = again;
        }
        Err(Failure::Target(format!(
            "rows from {} on kept conflicting with changes made at the same moment by others; \
             nothing after them was imported. Run the import again",
            todo.first().map_or(0, |(at, _)| *at)
        )))
    }

    /// What a batch's rows write, each with its place in the source. One
    /// token for the batch: an attempt run again after a lost answer
    /// recognises the rows an earlier one inserted.
    fn writes(&self, rows: Vec<Valid>) -> Vec<(u64, LinkWrite)> {
        let time = Utc::now().trunc_subsecs(6);
        let token = LinkToken::random();
        let actor = Actor::new(IMPORT_CALLER.to_owned(), self.run_id.clone());
        rows.into_iter()
            .map(|row| {
                let mapping = Mapping {
                    user_id: row.user_id,
                    stripe_customer_id: row.stripe_customer_id,
                    stripe_account: row.stripe_account,
                    created_at: row.created_at.unwrap_or(time),
                };
                let write = LinkWrite {
                    mapping,
                    token,
                    time,
                    actor: actor.clone(),
                    prepared: None,
                };
                (row.at, write)
            })
            .collect()
    }

    /// One attempt at `rows`, or (a dry run) what it would find.
    async fn attempt(&self, rows: &[&(u64, LinkWrite)]) -> Result<Vec<LinkAttempt>, Failure> {
        if self.target_is_empty {
            return Ok(rows
                .iter()
                .map(|_| LinkAttempt::Holders(Vec::new()))
                .collect());
        }
        let writes: Vec<&LinkWrite> = rows.iter().map(|(_, write)| write).collect();
        let until = Instant::now() + BATCH_TIMEOUT;
        let attempts = if self.dry_run {
            self.db.link_batch_holders(&writes, until).await
        } else {
            self.db.link_batch(&writes, until).await
        };
        attempts.map_err(|err| Failure::Target(format!("the target database failed: {err}")))
    }

    /// Counts and remembers one decided row; its refusal, if it is refused.
    fn record(&mut self, (at, row): &(u64, LinkWrite), outcome: Outcome) -> Option<Refusal> {
        let mapping = &row.mapping;
        let (reason, holder) = match outcome {
            Outcome::Created => {
                self.counters.created(1);
                self.index.accept(mapping);
                return None;
            }
            Outcome::Present => {
                self.counters.present(1);
                self.index.accept(mapping);
                return None;
            }
            Outcome::ConflictInInput => (Reason::ConflictInInput, None),
            Outcome::Conflict { on_user, holder } => {
                let reason = if self.index.accepted(&holder) {
                    Reason::ConflictInInput
                } else if on_user {
                    Reason::UserAlreadyLinked
                } else {
                    Reason::CustomerAlreadyLinked
                };
                (reason, Some(holder))
            }
        };
        let detail = match (reason, &holder) {
            (Reason::ConflictInInput, Some(_)) => {
                "contradicts an earlier row of this input, imported or already present"
            }
            (Reason::ConflictInInput, None) => {
                "contradicts an earlier row of this input (which a dry run did not write)"
            }
            (Reason::UserAlreadyLinked, _) => "the user is linked to another Stripe customer",
            _ => "the Stripe customer is linked to another user",
        };
        Some(Refusal {
            at: *at,
            user_id: mapping.user_id.to_string(),
            stripe_customer_id: mapping.stripe_customer_id.to_string(),
            stripe_account: mapping.stripe_account.to_string(),
            reason,
            existing: holder.map(|h| (h.user_id.into(), h.stripe_customer_id.into())),
            detail: detail.to_owned(),
        })
    }

    /// Logs the summary and chooses the exit status.
    fn finish(mut self, ended: Result<(), Failure>, interrupted: bool) -> ExitCode {
        let flushed = self.report.flush();
        let counters = self.counters.snapshot();
        let seconds = self.started.elapsed().as_secs_f64();
        let summary = format!(
            "{} rows read, {} {}, {} already present, {} refused{} in {:.1} s ({:.0} rows/s)",
            counters.read,
            counters.created,
            if self.dry_run {
                "would be created"
            } else {
                "created"
            },
            counters.present,
            counters.refused,
            self.report
                .path()
                .map(|p| format!(" (reported in {})", p.display()))
                .unwrap_or_default(),
            seconds,
            counters.read as f64 / seconds.max(1e-3),
        );
        let ended = ended.and(flushed.map_err(Failure::Source));
        let then = if self.dry_run {
            "a dry run writes nothing"
        } else {
            "what was counted as created is committed, and running the import again \
             continues where it stopped"
        };
        let c = counters;
        match ended {
            Err(failure) => {
                let (status, error) = failure.into_exit();
                tracing::error!(
                    run = %self.run_id, dry_run = self.dry_run, read = c.read,
                    created = c.created, present = c.present, refused = c.refused,
                    error, "import stopped: {summary}; {then}"
                );
                return ExitCode::from(status);
            }
            Ok(()) if interrupted => {
                tracing::warn!(
                    run = %self.run_id, dry_run = self.dry_run, read = c.read,
                    created = c.created, present = c.present, refused = c.refused,
                    "import interrupted: {summary}; {then}"
                );
                return ExitCode::from(EXIT_INTERRUPTED);
            }
            Ok(()) => tracing::info!(
                run = %self.run_id, dry_run = self.dry_run, read = c.read,
                created = c.created, present = c.present, refused = c.refused,
                "import finished: {summary}"
            ),
        }
        if counters.refused > 0 {
            if self.report.path().is_none() {
                tracing::warn!("rows were refused: run again with --report PATH to list them");
            }
            return ExitCode::from(EXIT_REFUSED);
        }
        ExitCode::SUCCESS
    }
}

/// Rows to apply in one statement, no two sharing a user or a customer in
/// one account.
#[derive(Default)]
struct Batch {
    rows: Vec<Valid>,
    /// Rows the reader refused, reported with the batch so that the report
    /// follows the input's order.
    refused: Vec<Refusal>,
    keys: KeySet,
}

impl Batch {
    fn admits(&self, keys: LinkKeys) -> bool {
        self.keys.admits(keys)
    }

    fn push(&mut self, row: Valid, keys: LinkKeys) {
        self.keys.add(keys);
        self.rows.push(row);
    }
}

/// What happened to one row.
enum Outcome {
    Created,
    Present,
    /// A dry run found it contradicting an earlier row of the input that is
    /// not in the database.
    ConflictInInput,
    /// Another mapping holds the user (`on_user`) or the customer.
    Conflict {
        on_user: bool,
        holder: Mapping,
    },
}

impl Outcome {
    /// A row's outcome from Link's; `None` while undecided.
    fn decided(outcome: LinkOutcome) -> Option<Self> {
        Some(match outcome {
            LinkOutcome::Created(_) => Outcome::Created,
            LinkOutcome::Present(_) => Outcome::Present,
            LinkOutcome::UserConflict(holder) => Outcome::Conflict {
                on_user: true,
                holder,
            },
            LinkOutcome::CustomerConflict(holder) => Outcome::Conflict {
                on_user: false,
                holder,
            },
            // An import prepares nothing, so is never stale.
            LinkOutcome::Undecided | LinkOutcome::Stale(_) => return None,
        })
    }
}

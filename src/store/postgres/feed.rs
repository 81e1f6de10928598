//! The change feed on PostgreSQL: what Watch reads, and why it never skips
//! an event and keeps each key's events in commit order.
//!
//! # Why a sequence is not a cursor
//!
//! An event's `sequence` is drawn when its row is written, not when it
//! commits: a transaction can draw 10, another draw 11 and commit first. A
//! reader that handed out "after 11" would never deliver 10. Transaction
//! ids (`xid8`) have the same flaw: a long import batch takes its id at its
//! first row and can commit after younger transactions, even after one it
//! waited for on the same key.
//!
//! # Positions are snapshots
//!
//! Every event row records the id of the transaction that wrote it
//! (`transaction_id`, filled by a column default, so every writer records
//! it without naming it: this release, the previous one, `import`). A
//! PostgreSQL snapshot says which transactions had committed when it was
//! taken: all ids below its `xmin`, and those below its `xmax` not listed
//! as in progress (`xip`). A position is a snapshot: **the reader has been
//! handed exactly the events of the transactions the snapshot sees.**
//!
//! Moving from snapshot `S` to a later one `T` delivers the events `T`
//! sees and `S` does not: those of transactions in `S`'s `xip` or with an
//! id at or above `S`'s `xmax`, filtered by `pg_visible_in_snapshot(id,
//! T)` (or read under `T` itself, the statement's own snapshot). Then:
//!
//! - **Nothing skipped.** A transaction in progress at `S` is not seen by
//!   `S`, so its events are still ahead of the position, whenever it
//!   commits. Every snapshot sees everything an earlier one saw, so every
//!   event is delivered by exactly one step. A transaction held open for
//!   minutes delays only its own events, not the ones committed after it.
//! - **Nothing twice.** A step delivers only what its start did not see.
//! - **Per key, commit order.** Two changes of one user (or one customer)
//!   are serialized by its row and its unique index: the later one waits
//!   for the earlier one to commit before it writes its row and then draws
//!   its event's sequence. Any snapshot that sees the later one sees the
//!   earlier one (it committed first), so they are delivered by the same
//!   step or in order; within a step, events go by `sequence`, which for
//!   one key is commit order. (This needs the sequence's default cache of
//!   1: a session caching values could draw a smaller one later.)
//!
//! Rows written before the column existed have no transaction id: the
//! migration that added it waited for every transaction writing events,
//! so every snapshot sees them, and only a read from the beginning
//! delivers them.
//!
//! A step larger than one read is paged by sequence within the same
//! target snapshot: the position then also holds the target and the last
//! sequence handed out.
//!
//! A restore from `pg_dump` into another cluster numbers transactions
//! afresh: the README's runbook clears the restored transaction ids (so
//! the restored events count as written before the column existed) and
//! the deployment id (so every cursor of the old cluster is refused).

use sea_orm::{
    DbErr, FromQueryResult, QueryResult,
    sqlx::{self, Row},
};
use tokio::time::Instant;

use super::pool::{Pool, sqlx_err};
use crate::store::{event_entity::Model as EventRow, feed::Reader};

/// A PostgreSQL snapshot (`pg_snapshot`): transactions below `xmin`, and
/// those below `xmax` not in `xip`, had committed (or aborted) when it was
/// taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted, each in `xmin..xmax`.
    xip: Vec<u64>,
}

impl Snapshot {
    /// `None` unless it is a snapshot PostgreSQL could have taken.
    pub fn new(xmin: u64, xmax: u64, mut xip: Vec<u64>) -> Option<Self> {
        xip.sort_unstable();
        xip.dedup();
        let inside = xip.iter().all(|x| (xmin..xmax).contains(x));
        (xmin <= xmax && inside).then_some(Self { xmin, xmax, xip })
    }

    /// `pg_snapshot`'s text form, `xmin:xmax:xip,...`.
    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        if parts.next().is_some() {
            return None;
        }
        Self::new(xmin, xmax, xip)
    }

    fn text(&self) -> String {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        format!("{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }

    fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether every transaction `self` sees, `other` sees too.
    fn is_within(&self, other: &Snapshot) -> bool {
        self.xmax <= other.xmax && other.xip.iter().all(|x| *x >= self.xmax || !self.sees(*x))
    }

    fn write(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&self.xmin.to_be_bytes());
        bytes.extend_from_slice(&self.xmax.to_be_bytes());
        bytes.extend_from_slice(&(self.xip.len() as u64).to_be_bytes());
        for x in &self.xip {
            bytes.extend_from_slice(&x.to_be_bytes());
        }
    }
}

/// A reader's place in the feed: every event of the transactions `seen`
/// sees (none when `None`: the beginning), plus, while a step to a later
/// snapshot is paged, that step's events up to a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    seen: Option<Snapshot>,
    within: Option<Within>,
}

/// Part of the step from `seen` to `target`: its events up to `last`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Within {
    target: Snapshot,
    last: i64,
}

const HAS_SEEN: u8 = 1;
const HAS_WITHIN: u8 = 2;

impl Position {
    /// Nothing handed out yet.
    pub fn beginning() -> Self {
        Self {
            seen: None,
            within: None,
        }
    }

    /// Every event `seen` sees.
    pub fn at(seen: Snapshot) -> Self {
        Self {
            seen: Some(seen),
            within: None,
        }
    }

    /// Part of the step from `seen` to `target`.
    pub fn within(seen: Option<Snapshot>, target: Snapshot, last: i64) -> Self {
        Self {
            seen,
            within: Some(Within { target, last }),
        }
    }

    /// The snapshot this position is at or moving to.
    fn frontier(&self) -> Option<&Snapshot> {
        match &self.within {
            Some(within) => Some(&within.target),
            None => self.seen.as_ref(),
        }
    }

    /// Whether a reader at `self` can read on to `other` without moving
    /// back: `other` has handed out everything `self` will have once its
    /// current step is done.
    pub fn is_within(&self, other: &Position) -> bool {
        if self == other {
            return true;
        }
        let Some(mine) = self.frontier() else {
            return true;
        };
        match (&other.within, &other.seen) {
            (None, Some(theirs)) => mine.is_within(theirs),
            _ => false,
        }
    }

    pub(in crate::store) fn write(&self, bytes: &mut Vec<u8>) {
        let flags =
            u8::from(self.seen.is_some()) * HAS_SEEN + u8::from(self.within.is_some()) * HAS_WITHIN;
        bytes.push(flags);
        if let Some(seen) = &self.seen {
            seen.write(bytes);
        }
        if let Some(within) = &self.within {
            within.target.write(bytes);
            bytes.extend_from_slice(&within.last.to_be_bytes());
        }
    }

    pub(in crate::store) fn read(reader: &mut Reader<'_>) -> Option<Self> {
        let flags = reader.byte()?;
        if flags & !(HAS_SEEN | HAS_WITHIN) != 0 {
            return None;
        }
        let seen = if flags & HAS_SEEN != 0 {
            Some(reader.snapshot()?)
        } else {
            None
        };
        let within = if flags & HAS_WITHIN != 0 {
            let target = reader.snapshot()?;
            let last = reader.i64()?;
            Some(Within { target, last })
        } else {
            None
        };
        Some(Self { seen, within })
    }
}

/// One read of the feed: up to `$3` events, in sequence order, after
/// sequence `$2`, of those the snapshot `$1` sees (the statement's own when
/// NULL) and `step` selects. Every row carries the text of the snapshot
/// read to (the events' columns are NULL on the one row of an empty read).
macro_rules! feed_sql {
    ($sequence:literal, $step:expr) => {
        concat!(
            "WITH snap AS (SELECT COALESCE($1::text::pg_snapshot, pg_current_snapshot()) AS s)
SELECT snap.s::text AS snapshot, e.sequence, e.kind, e.user_id, e.stripe_customer_id,
       e.mapping_created_at, e.time, e.caller, e.request_id, e.stripe_account
FROM snap LEFT JOIN LATERAL (
    SELECT * FROM mapping_events
    WHERE ",
            $sequence,
            " > $2",
            $step,
            "
      AND (transaction_id IS NULL OR pg_visible_in_snapshot(transaction_id, snap.s))
    ORDER BY ",
            $sequence,
            " LIMIT $3
) e ON TRUE
ORDER BY e.sequence"
        )
    };
}

/// The events of a step from a snapshot whose `xmax` is `$4` and whose
/// in-progress ids are `$5`.
macro_rules! in_step {
    () => {
        " AND (transaction_id >= $4::text::xid8 OR transaction_id = ANY($5::text[]::xid8[]))"
    };
}

/// Reads from the beginning: every event, by sequence.
const FROM_BEGINNING: &str = feed_sql!("sequence", "");

/// The first read of a step: its events are found by transaction id
/// (`idx_mapping_events_transaction_id`); `+ 0` keeps the planner from
/// walking the trail in sequence order to find them.
const STEP_FIRST: &str = feed_sql!("sequence + 0", in_step!());

/// The next pages of a step too large for one read, by sequence from the
/// last one handed out.
const STEP_NEXT: &str = feed_sql!("sequence", in_step!());

/// For the feed's reads only: no sequential scan. A step's events are a
/// sliver of the trail, but before the table's first `ANALYZE` (a new
/// deployment, or just after an import) the planner's default estimates
/// choose to scan every event at each poll. `SET LOCAL` ends with the
/// transaction; a connection whose read fails is closed, never reused, so
/// the setting cannot outlive the read.
const BEGIN_READ: &str = "BEGIN READ ONLY; SET LOCAL enable_seqscan = off";

/// The present, as a position: every event committed now is before it.
pub(super) async fn present(pool: &Pool, until: Instant) -> Result<Position, DbErr> {
    let mut conn = pool.acquire(until).await?;
    let text: String = conn
        .bounded(until, "reading the feed", async |conn| {
            sqlx::query_scalar("SELECT pg_current_snapshot()::text")
                .fetch_one(conn)
                .await
        })
        .await?;
    conn.release();
    snapshot(&text).map(Position::at)
}

/// Up to `limit` events after `from`, in feed order, reading on to `up_to`
/// (the present when `None`); the position after them, and whether it is
/// `up_to` (or the present of the read).
pub(super) async fn read(
    pool: &Pool,
    from: &Position,
    up_to: Option<&Position>,
    limit: u64,
    until: Instant,
) -> Result<(Vec<EventRow>, Position, bool), DbErr> {
    if up_to == Some(from) {
        return Ok((Vec::new(), from.clone(), true));
    }
    // A step in progress is finished first, towards its own target. A
    // position in the middle of a step is no target: read to the present.
    let complete = up_to.filter(|p| p.within.is_none());
    let (target, after) = match (&from.within, complete.and_then(|p| p.seen.as_ref())) {
        (Some(within), _) => (Some(&within.target), Some(within.last)),
        (None, target) => (target, None),
    };
    let sql = match (&from.seen, after) {
        (None, _) => FROM_BEGINNING,
        (Some(_), None) => STEP_FIRST,
        (Some(_), Some(_)) => STEP_NEXT,
    };
    let step = from.seen.as_ref().map(|seen| {
        let xip: Vec<String> = seen.xip.iter().map(u64::to_string).collect();
        (seen.xmax.to_string(), xip)
    });
    let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut conn = pool.acquire(until).await?;
    let rows = conn
        .bounded(until, "reading the feed", async |conn| {
            sqlx::raw_sql(BEGIN_READ).execute(&mut *conn).await?;
            let mut query = sqlx::query(sql)
                .bind(target.map(Snapshot::text))
                .bind(after.unwrap_or(0))
                .bind(limit_param);
            if let Some((xmax, xip)) = &step {
                query = query.bind(xmax).bind(xip);
            }
            let rows = query.fetch_all(&mut *conn).await?;
            sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
            Ok(rows)
        })
        .await?;
    conn.release();
    let text: String = match rows.first() {
        Some(row) => row.try_get("snapshot").map_err(sqlx_err)?,
        None => return Err(DbErr::Custom("the feed read returned no row".into())),
    };
    let read_to = snapshot(&text)?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        if row
            .try_get::<Option<i64>, _>("sequence")
            .map_err(sqlx_err)?
            .is_some()
        {
            events.push(EventRow::from_query_result(&QueryResult::from(row), "")?);
        }
    }
    let full = events.len() as u64 >= limit;
    let position = match events.last() {
        Some(last) if full => Position::within(from.seen.clone(), read_to, last.sequence),
        _ => Position::at(read_to),
    };
    let reached = !full && up_to.is_none_or(|wanted| *wanted == position);
    Ok((events, position, reached))
}

fn snapshot(text: &str) -> Result<Snapshot, DbErr> {
    Snapshot::parse(text).ok_or_else(|| DbErr::Type(format!("unreadable snapshot {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(xmin: u64, xmax: u64, xip: &[u64]) -> Snapshot {
        Snapshot::new(xmin, xmax, xip.to_vec()).expect("valid")
    }

    #[test]
    fn snapshots_parse_as_postgresql_prints_them() {
        assert_eq!(Snapshot::parse("10:15:10,12"), Some(s(10, 15, &[10, 12])));
        assert_eq!(Snapshot::parse("10:10:"), Some(s(10, 10, &[])));
        assert_eq!(s(10, 15, &[12, 10]).text(), "10:15:10,12");
        for bad in [
            "", "10", "10:15", "15:10:", "10:15:16", "10:15:9", "a:b:", "1:2::",
        ] {
            assert_eq!(Snapshot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_later_snapshot_sees_everything_an_earlier_one_did() {
        let earlier = s(10, 15, &[10, 12]);
        // 10 and 12 committed since, 15 and 16 began.
        let later = s(15, 20, &[15, 16]);
        assert!(earlier.is_within(&later));
        assert!(!later.is_within(&earlier));
        // 11 committed before `earlier`: a snapshot that lists it in
        // progress cannot be later.
        assert!(!earlier.is_within(&s(11, 20, &[11])));
        assert!(earlier.is_within(&earlier));
    }

    #[test]
    fn a_reader_may_only_read_on_to_a_position_at_or_past_its_own() {
        let earlier = Position::at(s(10, 15, &[10]));
        let later = Position::at(s(15, 20, &[]));
        assert!(Position::beginning().is_within(&later));
        assert!(earlier.is_within(&later));
        assert!(!later.is_within(&earlier));
        // Halfway to `later`: it may only read on to `later` or past it.
        let halfway = Position::within(Some(s(10, 15, &[10])), s(15, 20, &[]), 7);
        assert!(halfway.is_within(&later));
        assert!(halfway.is_within(&halfway));
        assert!(!halfway.is_within(&earlier));
        assert!(!later.is_within(&halfway));
    }
}

//! Where a reader of the change feed (Watch) stands, for either database,
//! and how that position travels in a cursor. What a position means on
//! each database, and why the feed never skips, is explained where it is
//! read: `postgres/feed.rs` and `sqlite.rs`.

use super::postgres::feed::{Position, Snapshot};
use crate::mapping::Event;

/// What a reader of the feed has been handed: every event before this
/// point, none after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedPosition {
    /// SQLite: every event up to this sequence (0: none).
    Sequence(i64),
    /// PostgreSQL: every event of the transactions a snapshot sees.
    Snapshot(Position),
}

/// One read of the feed.
#[derive(Debug)]
pub struct FeedPage {
    /// The next events, in feed order.
    pub events: Vec<Event>,
    /// The position after them.
    pub position: FeedPosition,
    /// Whether the read reached what it was asked to read up to (or the
    /// database's present): no event follows before that point.
    pub reached: bool,
}

const SEQUENCE: u8 = 1;
const SNAPSHOT: u8 = 2;

impl FeedPosition {
    /// Whether every event before `self` is also before `other`, so that a
    /// reader at `self` may read on up to `other` (positions only move
    /// forward). `false` for positions of different databases.
    pub fn is_within(&self, other: &FeedPosition) -> bool {
        match (self, other) {
            (Self::Sequence(a), Self::Sequence(b)) => a <= b,
            (Self::Snapshot(a), Self::Snapshot(b)) => a.is_within(b),
            _ => false,
        }
    }

    /// The position as bytes, for a cursor.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        match self {
            Self::Sequence(sequence) => {
                bytes.push(SEQUENCE);
                bytes.extend_from_slice(&sequence.to_be_bytes());
            }
            Self::Snapshot(position) => {
                bytes.push(SNAPSHOT);
                position.write(&mut bytes);
            }
        }
        bytes
    }

    /// The position of bytes made by [`FeedPosition::to_bytes`]; `None`
    /// for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut reader = Reader(bytes);
        let position = match reader.byte()? {
            SEQUENCE => Self::Sequence(reader.i64().filter(|s| *s >= 0)?),
            SNAPSHOT => Self::Snapshot(Position::read(&mut reader)?),
            _ => return None,
        };
        reader.0.is_empty().then_some(position)
    }
}

/// Reads what [`FeedPosition::to_bytes`] wrote.
pub(super) struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    pub fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }

    pub fn i64(&mut self) -> Option<i64> {
        self.u64().map(|n| n as i64)
    }

    /// A snapshot: xmin, xmax, the count of in-flight ids, the ids.
    pub fn snapshot(&mut self) -> Option<Snapshot> {
        let xmin = self.u64()?;
        let xmax = self.u64()?;
        let count = usize::try_from(self.u64()?).ok()?;
        // Each id takes 8 bytes: a count the bytes cannot hold is a lie.
        if count > self.0.len() / 8 {
            return None;
        }
        let xip = (0..count).map(|_| self.u64()).collect::<Option<Vec<_>>>()?;
        Snapshot::new(xmin, xmax, xip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(xmin: u64, xmax: u64, xip: &[u64]) -> Snapshot {
        Snapshot::new(xmin, xmax, xip.to_vec()).expect("a valid snapshot")
    }

    #[test]
    fn positions_survive_their_bytes_and_nothing_else_decodes() {
        let positions = [
            FeedPosition::Sequence(0),
            FeedPosition::Sequence(42),
            FeedPosition::Snapshot(Position::beginning()),
            FeedPosition::Snapshot(Position::at(snapshot(10, 15, &[10, 12]))),
            FeedPosition::Snapshot(Position::within(
                Some(snapshot(10, 15, &[10, 12])),
                snapshot(12, 20, &[12]),
                77,
            )),
        ];
        for position in positions {
            let bytes = position.to_bytes();
            assert_eq!(FeedPosition::from_bytes(&bytes), Some(position.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(FeedPosition::from_bytes(&bytes[..cut]), None, "{cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(FeedPosition::from_bytes(&longer), None);
        }
        assert_eq!(FeedPosition::from_bytes(&[]), None);
        assert_eq!(FeedPosition::from_bytes(&[9, 0, 0]), None);
    }
}

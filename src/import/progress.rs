//! Progress: a line redrawn on stderr when it is a terminal, a log line
//! every few seconds otherwise.

use std::{
    io::{IsTerminal, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

/// How often the terminal line is redrawn.
const REDRAW: Duration = Duration::from_millis(200);
/// How often a log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Rows counted once decided (created and present once committed).
#[derive(Debug, Default)]
pub struct Counters {
    read: AtomicU64,
    created: AtomicU64,
    present: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub read: u64,
    pub created: u64,
    pub present: u64,
    pub refused: u64,
}

impl Counters {
    pub fn read(&self, n: u64) {
        self.read.fetch_add(n, Relaxed);
    }
    pub fn created(&self, n: u64) {
        self.created.fetch_add(n, Relaxed);
    }
    pub fn present(&self, n: u64) {
        self.present.fetch_add(n, Relaxed);
    }
    pub fn refused(&self, n: u64) {
        self.refused.fetch_add(n, Relaxed);
    }
    pub fn snapshot(&self) -> Counts {
        Counts {
            read: self.read.load(Relaxed),
            created: self.created.load(Relaxed),
            present: self.present.load(Relaxed),
            refused: self.refused.load(Relaxed),
        }
    }
}

/// How far the reader is through the source, for the ETA: bytes of a CSV
/// file, rows of a table.
#[derive(Debug, Default)]
pub struct Position {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// Stops the progress display when dropped (clearing the terminal line).
pub struct Display {
    task: tokio::task::JoinHandle<()>,
    terminal: bool,
}

impl Drop for Display {
    fn drop(&mut self) {
        self.task.abort();
        if self.terminal {
            eprint!("\r\x1b[2K");
        }
    }
}

pub fn spawn(counters: Arc<Counters>, position: Arc<Position>, started: Instant) -> Display {
    let terminal = std::io::stderr().is_terminal();
    let task = tokio::spawn(async move {
        let every = if terminal { REDRAW } else { LOG_EVERY };
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            ticks.tick().await;
            let counts = counters.snapshot();
            let elapsed = started.elapsed().as_secs_f64().max(1e-3);
            let rate = counts.read as f64 / elapsed;
            let (done, total) = (position.done.load(Relaxed), position.total.load(Relaxed));
            let eta = (total > 0 && done > 0)
                .then(|| elapsed * (total.saturating_sub(done)) as f64 / done as f64);
            if terminal {
                let percent = if total > 0 {
                    format!("{:>3.0}% ", 100.0 * done as f64 / total as f64)
                } else {
                    String::new()
                };
                let eta = eta.map_or_else(String::new, |s| format!(" · ETA {s:.0} s"));
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{percent}{} read · {} created · {} present · {} refused · {rate:.0} rows/s{eta}",
                    counts.read, counts.created, counts.present, counts.refused
                );
                let _ = err.flush();
            } else {
                tracing::info!(
                    read = counts.read,
                    created = counts.created,
                    present = counts.present,
                    refused = counts.refused,
                    rows_per_s = rate.round() as u64,
                    eta_s = eta.map(|s| s.round() as u64),
                    "import progress"
                );
            }
        }
    });
    Display { task, terminal }
}

//! Logging and metrics, set up once at start.

pub mod metrics;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Default filter: `info`, without PostgreSQL's chatty notices ("relation
/// already exists, skipping" from idempotent migrations).
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// Log lines that may wait for the writer thread before a logging call
/// blocks (it blocks rather than drop lines: nothing is lost).
const BUFFERED_LINES: usize = 16 * 1024;

/// Installs the global subscriber: level from `RUST_LOG` (default `info`),
/// text or JSON lines on stdout.
///
/// Lines are written by a dedicated thread, so the `write` to stdout (one
/// per RPC, 9% of the server's CPU under load when done inline) leaves the
/// request path. Keep the returned guard until exit: dropping it flushes.
#[must_use = "dropping the guard stops logging; keep it until exit"]
pub fn init(format: LogFormat) -> WorkerGuard {
    exit_if_the_log_writer_panics();
    let (stdout, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name(LOG_WRITER)
        // Buffered: the thread writes every line waiting in one `write`.
        .finish(LineBatches(std::io::BufWriter::new(std::io::stdout())));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(stdout)).init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(stdout),
            )
            .init(),
    }
    guard
}

/// Name of the thread that writes log lines.
const LOG_WRITER: &str = "log-writer";

/// A log writer that died would leave a server that serves without a word
/// in its log: exit instead (with the reason on stderr, the only channel
/// left), so the orchestrator restarts it. Other panics keep the default
/// behaviour: long-lived tasks are watched in `startup`.
fn exit_if_the_log_writer_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if std::thread::current().name() == Some(LOG_WRITER) {
            eprintln!("the log writer task panicked; exiting so that it is restarted");
            std::process::exit(70);
        }
    }));
}

/// The log thread's writer. tracing-appender writes each waiting line, then
/// flushes once the queue is empty; through a `BufWriter` that makes one
/// `write(2)` per batch instead of one per line.
struct LineBatches(std::io::BufWriter<std::io::Stdout>);

impl std::io::Write for LineBatches {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Debug builds only: lets the tests prove that a dead writer ends
        // the process. It dies on the first line after the "serving" line,
        // which it flushes first, so the test sees the server start.
        #[cfg(debug_assertions)]
        if std::env::var("CUSTOMER_MAPPING_TEST_PANIC_TASK").is_ok_and(|task| task == "log writer")
        {
            use std::sync::atomic::{AtomicBool, Ordering};
            static SERVED: AtomicBool = AtomicBool::new(false);
            if SERVED.load(Ordering::Relaxed) {
                self.0.flush()?;
                panic!("CUSTOMER_MAPPING_TEST_PANIC_TASK: panicking in the log writer, as asked");
            }
            if buf.windows(7).any(|w| w == b"serving") {
                SERVED.store(true, Ordering::Relaxed);
            }
        }
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

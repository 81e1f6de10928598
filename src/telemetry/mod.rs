//! Logging, metrics and traces, set up once at start.

pub mod metrics;
pub mod traces;

mod writer;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;
pub use traces::TracesGuard;
use writer::LOG_WRITER;
pub use writer::LogGuard;

/// Default filter: `info`, without PostgreSQL's chatty notices ("relation
/// already exists, skipping" from idempotent migrations).
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// Installs the global subscriber: level from `RUST_LOG` (default `info`),
/// text or JSON lines on stdout, and spans exported to `otlp_endpoint`
/// when given (nothing at all when not).
///
/// Lines are written by a dedicated thread in batches (`writer.rs`), so the
/// `write` to stdout (one per RPC, 9% of the server's CPU under load when
/// done inline) leaves the request path, and so does waking a writer for
/// every line. Keep the returned guard until exit: dropping it flushes the
/// spans, then the lines.
pub fn init(format: LogFormat, otlp_endpoint: Option<&url::Url>) -> anyhow::Result<Telemetry> {
    exit_if_the_log_writer_panics();
    let (stdout, logs) = writer::spawn(std::io::stdout())?;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let (spans, traces) = match otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = traces::exporter(endpoint)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(spans);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(colours()).with_writer(stdout))
            .init(),
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
    Ok(Telemetry {
        _traces: traces,
        _logs: logs,
    })
}

/// Keep until exit: dropping it sends the spans still batched (bounded),
/// then writes the lines still buffered (bounded).
#[must_use = "dropping it stops the log writer and the trace exporter; keep it until exit"]
pub struct Telemetry {
    // Fields drop in order: spans first, so that anything their flush
    // logs still reaches the log.
    _traces: Option<TracesGuard>,
    _logs: LogGuard,
}

/// Colours only for a person at a terminal: a file or a pipe (a log
/// collector) gets plain text, and so does anyone who sets `NO_COLOR`
/// (no-color.org).
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

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

//! All configuration, parsed once at start from flags and environment into a
//! complete, checked [`Settings`] before anything binds or connects.
//!
//! Every default is written once, in the clap attributes below; tests get
//! them from [`Settings::defaults`]. Every number has a [`Bounded`] range,
//! enforced while parsing and shown by `--help`. A refused value is one line
//! naming the flag, its environment variable, the value and the range
//! ([`Cli::load`] prints it and exits with status 2).

use std::{
    fmt,
    marker::PhantomData,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{
    Arg, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand,
    builder::TypedValueParser,
    error::{ContextKind, ContextValue, ErrorKind},
    parser::ValueSource,
};
use secrecy::{ExposeSecret, SecretString};

/// The single source of truth for which Stripe customer belongs to which user.
#[derive(Debug, Parser)]
#[command(name = "customer-mapping", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply pending database migrations and exit (for a Kubernetes Job).
    Migrate,
    /// Bring existing mappings in, with Link's rules: from a CSV file or
    /// from the replaced application's own PostgreSQL table. Exits 0 when
    /// no row was refused, 1 when some were, 2 on bad arguments or an
    /// unreadable source, 3 when the target database failed, 130 when
    /// interrupted.
    Import(ImportArgs),
}

/// `customer-mapping import`. The target is `DATABASE_URL`, as for
/// `migrate`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Import", group(
    clap::ArgGroup::new("source").required(true).args(["csv", "from_database_url"])
))]
pub struct ImportArgs {
    /// A CSV file with the header `user_id,stripe_customer_id` and
    /// optionally `created_at` (RFC 3339).
    #[arg(long, value_name = "PATH")]
    pub csv: Option<PathBuf>,

    /// The replaced application's PostgreSQL database, to read `--table`
    /// from (read only).
    #[arg(
        long,
        value_name = "URL",
        env = "IMPORT_FROM_DATABASE_URL",
        hide_env_values = true,
        value_parser = SourceUrl::parse,
        requires = "table"
    )]
    pub from_database_url: Option<SourceUrl>,

    /// The table to read, optionally schema-qualified (`public.stripe_customers`).
    #[arg(long, value_name = "NAME", requires = "from_database_url")]
    pub table: Option<String>,

    /// The table's column holding the user id.
    #[arg(
        long,
        value_name = "COLUMN",
        default_value = "user_id",
        requires = "from_database_url"
    )]
    pub user_column: String,

    /// The table's column holding the Stripe customer id.
    #[arg(
        long,
        value_name = "COLUMN",
        default_value = "stripe_customer_id",
        requires = "from_database_url"
    )]
    pub customer_column: String,

    /// The table's column holding when the mapping was created; by default
    /// `created_at` when the table has one, else the time of the import.
    #[arg(long, value_name = "COLUMN", requires = "from_database_url")]
    pub created_at_column: Option<String>,

    /// Write one CSV line per refused row here: where it was, both ids, the
    /// reason and the mapping that holds the user or the customer.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Read, check and report everything, and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Rows per database statement (1 to 10,000).
    #[arg(long, value_name = "ROWS", default_value = "5000", value_parser = bounds::IMPORT_BATCH_ROWS)]
    pub batch_rows: usize,
}

/// The URL of the database an import reads from: PostgreSQL only, and a
/// secret like `DATABASE_URL` (its `Debug` shows no password).
#[derive(Clone)]
pub struct SourceUrl(SecretString);

impl fmt::Debug for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SourceUrl(<redacted>)")
    }
}

impl SourceUrl {
    fn parse(raw: &str) -> Result<Self, String> {
        if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
            return Err("must be a postgres:// (or postgresql://) URL".to_owned());
        }
        DatabaseUrl::parse(raw).map(|url| Self(url.0))
    }

    /// The URL itself, password included: only to connect with.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

/// Exit status of a refused configuration (clap's own, for usage errors).
pub const CONFIG_ERROR_EXIT: u8 = 2;

/// What Kubernetes gives a pod between SIGTERM and SIGKILL unless told
/// otherwise (`terminationGracePeriodSeconds`, also deploy/kubernetes'):
/// the drain, the pool's close and the exit must fit in it.
pub const KUBERNETES_GRACE_PERIOD: Duration = Duration::from_secs(30);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The allowed range of each numeric setting.
pub mod bounds {
    use super::{Bounded, KUBERNETES_GRACE_PERIOD, ms, secs};
    use std::time::Duration;

    /// PostgreSQL's own default `max_connections` is 100; ten times that is
    /// beyond any single replica's need.
    pub const DATABASE_MAX_CONNECTIONS: Bounded<u32> = Bounded::new(1, 1000);
    pub const DATABASE_ACQUIRE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const DATABASE_CONNECT_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const DATABASE_STALL_TIMEOUT: Bounded<Duration> = Bounded::new(ms(1), secs(60));
    pub const SQLITE_BUSY_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const HEALTH_PROBE_INTERVAL: Bounded<Duration> = Bounded::new(ms(10), secs(600));
    /// Also shorter than the probe interval (checked with it).
    pub const HEALTH_PROBE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(600));
    /// The drain, then closing the pool (up to 2 s), then the exit, inside
    /// the grace period, with a few seconds to spare.
    pub const SHUTDOWN_DRAIN_TIMEOUT: Bounded<Duration> = Bounded::new(
        secs(1),
        Duration::from_secs(KUBERNETES_GRACE_PERIOD.as_secs() - 5),
    );
    /// gRPC's customary 4 MiB message limit; requests here are a few
    /// hundred bytes.
    pub const MAX_REQUEST_BYTES: Bounded<usize> = Bounded::new(1, 4 * 1024 * 1024);
    pub const MAX_CONCURRENT_STREAMS: Bounded<u32> = Bounded::new(1, 10_000);
    pub const MAX_CONCURRENT_REQUESTS: Bounded<usize> = Bounded::new(1, 100_000);
    pub const MAX_CONNECTIONS: Bounded<usize> = Bounded::new(1, 100_000);
    pub const DEFAULT_DEADLINE: Bounded<Duration> = Bounded::new(ms(10), secs(300));
    pub const HANDSHAKE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const HTTP2_KEEPALIVE_INTERVAL: Bounded<Duration> = Bounded::new(ms(10), secs(3600));
    pub const HTTP2_KEEPALIVE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(300));
    /// PostgreSQL takes a batch as three arrays, whatever its size; ten
    /// thousand rows is a statement of about a megabyte.
    pub const IMPORT_BATCH_ROWS: Bounded<usize> = Bounded::new(1, 10_000);
}

/// Each ranged argument's id and its range, for `--help` (the parsers are
/// given in the attributes; a unit test checks the two agree).
fn ranges() -> [(&'static str, String); 16] {
    use bounds::*;
    [
        (
            "database_max_connections",
            DATABASE_MAX_CONNECTIONS.to_string(),
        ),
        (
            "database_acquire_timeout",
            DATABASE_ACQUIRE_TIMEOUT.to_string(),
        ),
        (
            "database_connect_timeout",
            DATABASE_CONNECT_TIMEOUT.to_string(),
        ),
        ("database_stall_timeout", DATABASE_STALL_TIMEOUT.to_string()),
        ("sqlite_busy_timeout", SQLITE_BUSY_TIMEOUT.to_string()),
        ("health_probe_interval", HEALTH_PROBE_INTERVAL.to_string()),
        (
            "health_probe_timeout",
            format!("{HEALTH_PROBE_TIMEOUT}, below --health-probe-interval"),
        ),
        ("shutdown_drain_timeout", SHUTDOWN_DRAIN_TIMEOUT.to_string()),
        ("max_request_bytes", MAX_REQUEST_BYTES.to_string()),
        ("max_concurrent_streams", MAX_CONCURRENT_STREAMS.to_string()),
        (
            "max_concurrent_requests",
            MAX_CONCURRENT_REQUESTS.to_string(),
        ),
        ("max_connections", MAX_CONNECTIONS.to_string()),
        ("default_deadline", DEFAULT_DEADLINE.to_string()),
        ("handshake_timeout", HANDSHAKE_TIMEOUT.to_string()),
        (
            "http2_keepalive_interval",
            HTTP2_KEEPALIVE_INTERVAL.to_string(),
        ),
        (
            "http2_keepalive_timeout",
            HTTP2_KEEPALIVE_TIMEOUT.to_string(),
        ),
    ]
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to serve gRPC on. Use 0.0.0.0:50051 in a container.
    #[arg(
        long,
        env = "LISTEN_ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseSettings,

    #[command(flatten)]
    pub health: HealthSettings,

    #[command(flatten)]
    pub tls: TlsSettings,

    #[command(flatten)]
    pub access: AccessSettings,

    #[command(flatten)]
    pub limits: LimitSettings,

    /// Address to serve Prometheus metrics on (`/metrics`); off when unset.
    #[arg(long, env = "METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,

    /// On SIGTERM/SIGINT, how long in-flight RPCs may take to finish before
    /// they are cut off.
    #[arg(long, env = "SHUTDOWN_DRAIN_TIMEOUT", default_value = "20s", value_parser = bounds::SHUTDOWN_DRAIN_TIMEOUT, global = true)]
    pub shutdown_drain_timeout: Duration,

    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    #[command(flatten)]
    pub database_url: DatabaseUrl,

    /// Most connections the pool opens.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        default_value = "10",
        value_parser = bounds::DATABASE_MAX_CONNECTIONS,
        global = true
    )]
    pub database_max_connections: u32,

    /// How long a request waits for a free connection before UNAVAILABLE.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = bounds::DATABASE_ACQUIRE_TIMEOUT, global = true)]
    pub database_acquire_timeout: Duration,

    /// How long opening one database connection may take.
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = "5s", value_parser = bounds::DATABASE_CONNECT_TIMEOUT, global = true)]
    pub database_connect_timeout: Duration,

    /// PostgreSQL: how long a statement may be in flight before the calls
    /// queued to share the next one go out without it (a Link waiting on a
    /// lock holds up no other keys for longer).
    #[arg(long, env = "DATABASE_STALL_TIMEOUT", default_value = "100ms", value_parser = bounds::DATABASE_STALL_TIMEOUT, global = true)]
    pub database_stall_timeout: Duration,

    /// SQLite only: how long a write waits for another writer.
    #[arg(long, env = "SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = bounds::SQLITE_BUSY_TIMEOUT, global = true)]
    pub sqlite_busy_timeout: Duration,

    /// Apply pending migrations when `serve` starts. Turn off when a
    /// migration Job runs `customer-mapping migrate` instead.
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct HealthSettings {
    /// How often the database is checked to drive gRPC health (and, while
    /// it does not answer at start, how often connecting is retried).
    #[arg(long, env = "HEALTH_PROBE_INTERVAL", default_value = "5s", value_parser = bounds::HEALTH_PROBE_INTERVAL, global = true)]
    pub health_probe_interval: Duration,

    /// How long one database check may take before it counts as failed.
    #[arg(long, env = "HEALTH_PROBE_TIMEOUT", default_value = "2s", value_parser = bounds::HEALTH_PROBE_TIMEOUT, global = true)]
    pub health_probe_timeout: Duration,
}

/// Transport security. With neither file set the server speaks plaintext,
/// which it only does on a loopback address unless
/// `--allow-insecure-plaintext` says otherwise.
#[derive(Debug, Clone, Args)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first. With `--tls-key-file`, turns TLS on.
    /// Re-read on every new connection, so a rotated secret takes effect
    /// without a restart.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file", global = true)]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file", global = true)]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA certificates: turns mutual TLS on. Connections without a
    /// client certificate signed by one of them are refused.
    #[arg(
        long,
        env = "TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file",
        global = true
    )]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Serve plaintext gRPC on a non-loopback address. Only for networks
    /// that encrypt and authenticate on their own (a service mesh sidecar).
    #[arg(long, env = "ALLOW_INSECURE_PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set, global = true)]
    pub allow_insecure_plaintext: bool,
}

/// Who may call what, and what else is exposed.
#[derive(Debug, Clone, Args)]
pub struct AccessSettings {
    /// JSON file mapping caller identities (client certificate names or
    /// bearer token hashes) to the RPCs they may call. Without it every
    /// caller may call every RPC.
    #[arg(long, env = "POLICY_FILE", global = true)]
    pub policy_file: Option<PathBuf>,

    /// Serve gRPC server reflection (for grpcurl). Under a policy, only
    /// authenticated callers may use it.
    #[arg(long, env = "REFLECTION", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub reflection: bool,

    /// Also serve `grpc.health.v1` (and nothing else) in plaintext on this
    /// address, for Kubernetes probes, which can't present a certificate
    /// or token.
    #[arg(long, env = "HEALTH_LISTEN_ADDR", global = true)]
    pub health_listen_addr: Option<SocketAddr>,
}

/// Bounds on what one caller, one connection or the whole server can make
/// the service hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct LimitSettings {
    /// Largest request message accepted, in bytes; larger ones get
    /// RESOURCE_EXHAUSTED before any work is done.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value = "16384", value_parser = bounds::MAX_REQUEST_BYTES, global = true)]
    pub max_request_bytes: usize,

    /// Most RPCs one HTTP/2 connection may have open at once (advertised to
    /// the client, which queues the rest).
    #[arg(
        long,
        env = "MAX_CONCURRENT_STREAMS",
        default_value = "128",
        value_parser = bounds::MAX_CONCURRENT_STREAMS,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// Most CustomerMapping RPCs in progress over all connections; beyond it
    /// calls are shed at once with UNAVAILABLE instead of queueing.
    #[arg(
        long,
        env = "MAX_CONCURRENT_REQUESTS",
        default_value = "512",
        value_parser = bounds::MAX_CONCURRENT_REQUESTS,
        global = true
    )]
    pub max_concurrent_requests: usize,

    /// Most open client connections; further ones are closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value = "4096", value_parser = bounds::MAX_CONNECTIONS, global = true)]
    pub max_connections: usize,

    /// Deadline of a call whose caller set none (or a longer one).
    #[arg(long, env = "DEFAULT_DEADLINE", default_value = "10s", value_parser = bounds::DEFAULT_DEADLINE, global = true)]
    pub default_deadline: Duration,

    /// How long a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 preface before it is closed (slow-loris defence).
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = bounds::HANDSHAKE_TIMEOUT, global = true)]
    pub handshake_timeout: Duration,

    /// How often an idle connection is pinged (HTTP/2 PING).
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = bounds::HTTP2_KEEPALIVE_INTERVAL, global = true)]
    pub http2_keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is dropped.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = bounds::HTTP2_KEEPALIVE_TIMEOUT, global = true)]
    pub http2_keepalive_timeout: Duration,
}

/// A configuration that cannot be used, as the one line to print; or
/// `--help`/`--version`, which clap prints.
#[derive(Debug)]
pub struct ConfigError {
    line: String,
    clap: Option<clap::Error>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn line(line: impl Into<String>) -> Self {
        Self {
            line: line.into(),
            clap: None,
        }
    }

    /// Prints the error (or the help) and ends the process: status 0 for
    /// `--help`/`--version`, [`CONFIG_ERROR_EXIT`] for anything refused.
    pub fn exit(self) -> ! {
        if let Some(err) = self.clap.filter(|e| !e.use_stderr()) {
            err.exit();
        }
        eprintln!("customer-mapping: {}", self.line);
        std::process::exit(CONFIG_ERROR_EXIT.into())
    }
}

impl Cli {
    /// The command line of this process and its environment, checked; on a
    /// refused value prints one line and exits with status 2.
    pub fn load() -> Self {
        Self::try_load_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
    }

    /// Parses `args` (the first is the program name) and the environment,
    /// reads `DATABASE_URL_FILE`, and checks every value and the relations
    /// between them.
    pub fn try_load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::load_with(command(), args)
    }

    fn load_with<I, T>(mut command: clap::Command, args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let refused = |err: clap::Error, command: &clap::Command| ConfigError {
            line: one_line(&err, command),
            clap: Some(err),
        };
        let matches = command
            .try_get_matches_from_mut(args)
            .map_err(|e| refused(e, &command))?;
        let cli = Self::from_arg_matches(&matches).map_err(|e| refused(e, &command))?;
        cli.settings.check_relations().map_err(ConfigError::line)?;
        Ok(cli)
    }
}

/// The clap command, with each setting's range added to its help.
pub fn command() -> clap::Command {
    let ranges = ranges();
    Cli::command().mut_args(|arg| {
        let Some((_, range)) = ranges.iter().find(|(id, _)| arg.get_id() == id) else {
            return arg;
        };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let long_help = arg.get_long_help().map(ToString::to_string);
        let arg = arg.help(format!("{help} [range: {range}]"));
        match long_help {
            Some(long) => arg.long_help(format!("{long}\n\n[range: {range}]")),
            None => arg,
        }
    })
}

/// clap's error as one line (its first paragraph, which holds the allowed
/// values or the missing arguments), naming the environment variable as
/// well as the flag: a value may have come from either.
fn one_line(err: &clap::Error, command: &clap::Command) -> String {
    let rendered = err.render().to_string();
    let paragraph: Vec<&str> = rendered
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let first = paragraph.join(" ");
    let mut line = first.strip_prefix("error: ").unwrap_or(&first).to_owned();
    if line.is_empty() {
        line = "invalid configuration".into();
    }
    let invalid = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => Some(arg),
        Some(ContextValue::Strings(args)) => args.first(),
        _ => None,
    };
    if let Some(invalid) = invalid {
        let long = invalid
            .trim_start_matches('-')
            .split([' ', '=', '<'])
            .next()
            .unwrap_or_default();
        let env = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(Arg::get_env)
            .map(|e| e.to_string_lossy().into_owned());
        // clap's value name (`<LISTEN_ADDR>`) is not the variable named.
        let named = |env: &str| line.replace(&format!("<{env}>"), "").contains(env);
        if let Some(env) = env.filter(|env| !named(env)) {
            line.push_str(&format!(" (environment variable {env})"));
        }
    }
    line
}

impl Settings {
    /// Every setting at its default, whatever the environment says (tests
    /// start from these and change what they need).
    pub fn defaults() -> Self {
        let without_env = command().mut_args(|arg| arg.env(None));
        match Cli::load_with(without_env, ["customer-mapping"]) {
            Ok(cli) => cli.settings,
            // The defaults are ours, and a unit test parses them.
            Err(err) => unreachable!("the defaults are refused: {err}"),
        }
    }

    /// What no single value shows: settings that must agree.
    fn check_relations(&self) -> Result<(), String> {
        let health = &self.health;
        if health.health_probe_timeout >= health.health_probe_interval {
            return Err(format!(
                "invalid --health-probe-timeout (HEALTH_PROBE_TIMEOUT) \"{}\": must be shorter \
                 than --health-probe-interval (HEALTH_PROBE_INTERVAL) \"{}\", or checks overlap",
                humantime::format_duration(health.health_probe_timeout),
                humantime::format_duration(health.health_probe_interval),
            ));
        }
        let others = [
            (
                "--health-listen-addr (HEALTH_LISTEN_ADDR)",
                self.access.health_listen_addr,
            ),
            ("--metrics-addr (METRICS_ADDR)", self.metrics_addr),
        ];
        for (name, addr) in others {
            if let Some(addr) = addr.filter(|a| same_port(*a, self.listen_addr)) {
                return Err(format!(
                    "invalid {name} \"{addr}\": must not share its port with \
                     --listen-addr (LISTEN_ADDR) \"{}\"",
                    self.listen_addr
                ));
            }
        }
        if let (Some(health), Some(metrics)) = (self.access.health_listen_addr, self.metrics_addr)
            && same_port(health, metrics)
        {
            return Err(format!(
                "invalid --metrics-addr (METRICS_ADDR) \"{metrics}\": must not share its port \
                 with --health-listen-addr (HEALTH_LISTEN_ADDR) \"{health}\""
            ));
        }
        Ok(())
    }

    /// Refuses plaintext on a non-loopback address unless explicitly
    /// allowed: a Link from anyone on the network can redirect payments.
    pub fn check_transport(&self) -> anyhow::Result<()> {
        let plaintext = self.tls.tls_cert_file.is_none();
        if plaintext && !self.listen_addr.ip().is_loopback() && !self.tls.allow_insecure_plaintext {
            anyhow::bail!(
                "refusing to serve plaintext on {}: set TLS_CERT_FILE and TLS_KEY_FILE, \
                 or ALLOW_INSECURE_PLAINTEXT=true if the network encrypts for us",
                self.listen_addr
            );
        }
        Ok(())
    }
}

/// Two addresses that would fight over one port (port 0 picks a free one).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl DatabaseSettings {
    /// The URL without its password, safe for a log line.
    pub fn redacted_url(&self) -> String {
        self.database_url.redacted()
    }
}

/// The inclusive range a numeric setting accepts, and its value parser:
/// values outside are refused while parsing, with one line naming the flag,
/// its environment variable, the value and the range.
#[derive(Debug, Clone, Copy)]
pub struct Bounded<T> {
    pub min: T,
    pub max: T,
    _unit: PhantomData<fn() -> T>,
}

impl<T> Bounded<T> {
    pub const fn new(min: T, max: T) -> Self {
        Self {
            min,
            max,
            _unit: PhantomData,
        }
    }
}

/// A kind of number a setting holds.
pub trait Quantity: Copy + PartialOrd + Send + Sync + 'static {
    /// What a value looks like, for the error line.
    const EXPECTED: &'static str;
    fn parse(text: &str) -> Option<Self>;
    fn show(&self) -> String;
}

impl Quantity for Duration {
    const EXPECTED: &'static str = "a duration such as 5s or 250ms";
    fn parse(text: &str) -> Option<Self> {
        humantime::parse_duration(text.trim()).ok()
    }
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

macro_rules! count_quantity {
    ($($t:ty),*) => {$(
        impl Quantity for $t {
            const EXPECTED: &'static str = "a whole number";
            fn parse(text: &str) -> Option<Self> {
                text.trim().parse().ok()
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
count_quantity!(u32, usize);

impl<T: Quantity> fmt::Display for Bounded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.min.show(), self.max.show())
    }
}

impl<T: Quantity> Bounded<T> {
    /// `text` as a value in range, or why not.
    pub fn check(&self, text: &str) -> Result<T, String> {
        match T::parse(text) {
            Some(v) if v >= self.min && v <= self.max => Ok(v),
            Some(_) => Err(format!("allowed {self}")),
            None => Err(format!("not {}; allowed {self}", T::EXPECTED)),
        }
    }
}

impl<T: Quantity> TypedValueParser for Bounded<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    fn parse_ref_(
        &self,
        _cmd: &clap::Command,
        arg: Option<&Arg>,
        value: &std::ffi::OsStr,
        source: ValueSource,
    ) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        self.check(&text).map_err(|why| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid {} \"{text}\": {why}", arg_names(arg, source)),
            )
        })
    }
}

/// `--flag (ENV)`, or `ENV (--flag)` when the value came from the
/// environment: the name the operator wrote comes first.
fn arg_names(arg: Option<&Arg>, source: ValueSource) -> String {
    let long = arg
        .and_then(Arg::get_long)
        .map(|l| format!("--{l}"))
        .unwrap_or_else(|| "value".into());
    match arg.and_then(Arg::get_env) {
        Some(env) if source == ValueSource::EnvVariable => {
            format!("{} ({long})", env.to_string_lossy())
        }
        Some(env) => format!("{long} ({})", env.to_string_lossy()),
        None => long,
    }
}

const DATABASE_URL_DEFAULT: &str = "sqlite://customer-mapping.db?mode=rwc";

/// The database connection URL. It holds the password, so it is a secret:
/// its `Debug` shows it redacted, and only [`DatabaseUrl::expose_secret`]
/// gives the real one (to connect with).
///
/// Comes from `--database-url`, or from `--database-url-file`, read while
/// parsing; refused then if no retry could make it work (not a URL, a
/// scheme with no driver, a SQLite file in a directory that does not exist
/// or that can't be written).
#[derive(Clone)]
pub struct DatabaseUrl(SecretString);

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl DatabaseUrl {
    /// Checks the syntax and scheme (the error never contains the URL,
    /// which may hold a password).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        // The drivers are chosen by the URL's first letters, case and all.
        if !raw.starts_with(url.scheme()) {
            return Err(format!(
                "the scheme \"{}\" must be written in lower case",
                url.scheme()
            ));
        }
        match url.scheme() {
            "postgres" | "postgresql" => {
                use sea_orm::sqlx::postgres::PgConnectOptions;
                PgConnectOptions::from_str(raw)
                    .map_err(|_| "not a PostgreSQL connection URL".to_owned())?;
            }
            "sqlite" => {
                use sea_orm::sqlx::sqlite::SqliteConnectOptions;
                SqliteConnectOptions::from_str(raw)
                    .map_err(|e| format!("not a SQLite connection URL ({e})"))?;
                // SQLite opens a temporary database for an empty name: every
                // mapping would be gone at the next start.
                let (name, params) = sqlite_parts(raw).unwrap_or_default();
                if name.is_empty() && params.get("mode").map(String::as_str) != Some("memory") {
                    return Err("a SQLite URL naming no file (sqlite::memory: is the \
                                in-memory database)"
                        .to_owned());
                }
            }
            other => {
                return Err(format!(
                    "unsupported scheme \"{other}\": use postgres:// (or postgresql://) or sqlite://"
                ));
            }
        }
        Ok(Self(raw.into()))
    }

    /// The URL itself, password included: only to connect with.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL without its password, safe for a log line.
    pub fn redacted(&self) -> String {
        redact_url(self.expose_secret())
    }

    /// For SQLite, what no retry can fix: the file's directory missing, or
    /// the file not writable. (Whatever time can fix, like a PostgreSQL
    /// server that is not up yet, is left to the connection retries.)
    pub fn check_sqlite_file(&self) -> Result<(), String> {
        let Some(file) = sqlite_file(self.expose_secret()) else {
            return Ok(());
        };
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "the SQLite database's directory {} does not exist",
                dir.display()
            ));
        }
        // Opening for writing asks the OS what SQLite will ask it, whoever
        // we run as.
        match std::fs::OpenOptions::new().write(true).open(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
                "the SQLite database {} is read-only",
                file.display()
            )),
            _ => Ok(()),
        }
    }
}

/// The file a SQLite URL names, as sqlx reads it; `None` for PostgreSQL, an
/// in-memory database or a read-only (`mode=ro`) one.
fn sqlite_file(raw: &str) -> Option<PathBuf> {
    // Not SQLite: nothing on this machine to check.
    let (database, params) = sqlite_parts(raw)?;
    if database.is_empty()
        || database == ":memory:"
        || matches!(
            params.get("mode").map(String::as_str),
            Some("memory" | "ro")
        )
    {
        return None;
    }
    // sqlx's own reading of the path (it percent-decodes it).
    let options = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(raw).ok()?;
    Some(options.get_filename().to_path_buf())
}

/// A SQLite URL's database name (still percent-encoded) and its query
/// parameters, split as sqlx splits them.
fn sqlite_parts(raw: &str) -> Option<(&str, std::collections::HashMap<String, String>)> {
    let rest = raw
        .strip_prefix("sqlite://")
        .or_else(|| raw.strip_prefix("sqlite:"))?;
    let (database, params) = rest.split_once('?').unwrap_or((rest, ""));
    let params = url::form_urlencoded::parse(params.as_bytes())
        .into_owned()
        .collect();
    Some((database, params))
}

const URL_ARG: &str = "database_url";
const URL_FILE_ARG: &str = "database_url_file";

impl Args for DatabaseUrl {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            Arg::new(URL_ARG)
                .long("database-url")
                .env("DATABASE_URL")
                .value_name("DATABASE_URL")
                .default_value(DATABASE_URL_DEFAULT)
                .hide_env_values(true)
                .global(true)
                .help(
                    "PostgreSQL (`postgres://user:password@host/db`) or SQLite \
                     (`sqlite://file.db?mode=rwc`) connection URL",
                ),
        )
        .arg(
            Arg::new(URL_FILE_ARG)
                .long("database-url-file")
                .env("DATABASE_URL_FILE")
                .value_name("DATABASE_URL_FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .conflicts_with(URL_ARG)
                .global(true)
                .help(
                    "File holding the connection URL (a mounted Kubernetes secret), read \
                     once at start; trailing whitespace is ignored",
                ),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for DatabaseUrl {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let refuse = |line: String| clap::Error::raw(ErrorKind::ValueValidation, line);
        let named = |id: &str, flag: &str, env: &str| match matches.value_source(id) {
            Some(ValueSource::EnvVariable) => format!("{env} ({flag})"),
            _ => format!("{flag} ({env})"),
        };
        let (url, name) = if let Some(path) = matches.get_one::<PathBuf>(URL_FILE_ARG) {
            let name = named(URL_FILE_ARG, "--database-url-file", "DATABASE_URL_FILE");
            let name = format!("{name} {}", path.display());
            let raw = std::fs::read_to_string(path)
                .map_err(|e| refuse(format!("invalid {name}: {e}")))?;
            let raw = raw.trim_end();
            if raw.is_empty() {
                return Err(refuse(format!("invalid {name}: the file is empty")));
            }
            let url = Self::parse(raw)
                .map_err(|why| refuse(format!("invalid {name}: the URL in it is {why}")))?;
            (url, name)
        } else {
            let name = named(URL_ARG, "--database-url", "DATABASE_URL");
            let raw = matches
                .get_one::<String>(URL_ARG)
                .map_or(DATABASE_URL_DEFAULT, String::as_str);
            let url = Self::parse(raw).map_err(|why| refuse(format!("invalid {name}: {why}")))?;
            (url, name)
        };
        url.check_sqlite_file()
            .map_err(|why| refuse(format!("unusable {name} \"{}\": {why}", url.redacted())))?;
        Ok(url)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// Replaces the password of a connection URL with `***`. A URL that does not
/// parse is replaced whole: it might hold a password in a place we can't see.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() && url.set_password(Some("***")).is_err() {
                return "<unparseable database url>".into();
            }
            // Query parameters (e.g. `?password=`) can carry secrets too.
            if url
                .query_pairs()
                .any(|(k, _)| k.eq_ignore_ascii_case("password"))
            {
                url.set_query(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "<unparseable database url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Cli, ConfigError> {
        let without_env = command().mut_args(|arg| arg.env(None));
        Cli::load_with(without_env, [&["customer-mapping"], args].concat())
    }

    #[test]
    fn redact_url_hides_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/mapping"),
            "postgres://app:***@db:5432/mapping"
        );
        assert_eq!(
            redact_url("postgres://app@db/mapping?password=s3cret&sslmode=require"),
            "postgres://app@db/mapping?***"
        );
        assert_eq!(
            redact_url("sqlite://customer-mapping.db?mode=rwc"),
            "sqlite://customer-mapping.db?mode=rwc"
        );
        assert!(!redact_url("not a url s3cret").contains("s3cret"));
    }

    #[test]
    fn defaults_serve_sqlite_on_loopback() {
        let cli = load(&[]).expect("defaults parse");
        assert!(cli.command.is_none());
        let settings = Settings::defaults();
        assert_eq!(settings.listen_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(
            settings.database.database_url.expose_secret(),
            DATABASE_URL_DEFAULT
        );
        assert!(settings.database.migrate_on_start);
        assert_eq!(cli.settings.limits, settings.limits);
        assert_eq!(settings.limits.max_request_bytes, 16 * 1024);
        assert_eq!(settings.health.health_probe_interval, secs(5));
        assert!(settings.access.reflection);
        assert!(settings.check_transport().is_ok());
    }

    #[test]
    fn no_debug_output_shows_the_database_password() {
        let cli = load(&["--database-url", "postgres://app:s3cret@db/mapping"]).expect("parses");
        let printed = format!("{cli:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("app:***@db"), "{printed}");
    }

    #[test]
    fn the_url_file_is_read_while_parsing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("DATABASE_URL");
        std::fs::write(&file, "postgres://app:s3cret@db/mapping\n").expect("written");
        let path = file.to_str().expect("a UTF-8 path");
        let cli = load(&["--database-url-file", path]).expect("parses");
        assert_eq!(
            cli.settings.database.database_url.expose_secret(),
            "postgres://app:s3cret@db/mapping"
        );

        std::fs::write(&file, "foo://app:s3cret@db/mapping").expect("written");
        let err = load(&["--database-url-file", path]).expect_err("a bad scheme");
        assert!(err.line.contains("--database-url-file"), "{err}");
        assert!(err.line.contains("\"foo\""), "{err}");
        assert!(!err.line.contains("s3cret"), "{err}");
    }

    #[test]
    fn every_range_is_enforced_as_help_says() {
        let command = command();
        for (id, range) in ranges() {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no argument {id}"));
            let help = arg.get_help().expect("help").to_string();
            assert!(help.contains(&range), "{id}: {help}");
            let flag = format!("--{}", arg.get_long().expect("a long flag"));
            for refused in ["0", "0s", "99999999999h", "99999999999999999999"] {
                // The flag wins over the environment; the line names both.
                let err = Cli::try_load_from(["customer-mapping", &flag, refused])
                    .expect_err(&format!("{flag} {refused}"));
                let env = arg.get_env().expect("an env var").to_string_lossy();
                assert!(err.line.contains(&flag), "{err}");
                assert!(err.line.contains(env.as_ref()), "{err}");
                assert!(err.line.contains(refused), "{err}");
                // The parser in the attribute is the one the table names.
                let bound = range.split(',').next().expect("a range");
                assert!(err.line.contains(&format!("allowed {bound}")), "{err}");
                assert!(!err.line.contains('\n'), "{err}");
            }
        }
    }

    #[test]
    fn every_number_has_a_range() {
        // Addresses, files, switches and the log format have no range.
        let unranged = [
            "listen_addr",
            "metrics_addr",
            "health_listen_addr",
            "database_url",
            "database_url_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_client_ca_file",
            "policy_file",
            "migrate_on_start",
            "allow_insecure_plaintext",
            "reflection",
            "log_format",
            "help",
            "version",
        ];
        let ranged: Vec<&str> = ranges().iter().map(|(id, _)| *id).collect();
        for arg in command().get_arguments() {
            let id = arg.get_id().as_str();
            assert!(
                ranged.contains(&id) || unranged.contains(&id),
                "{id}: give it a range in config::bounds"
            );
        }
    }

    #[test]
    fn the_readme_shows_every_range() {
        let readme = include_str!("../README.md");
        let command = command();
        for (id, range) in ranges() {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .expect("an argument");
            let flag = format!("`--{}`", arg.get_long().expect("a long flag"));
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| {flag}")))
                .unwrap_or_else(|| panic!("no README row for {flag}"));
            let range = range.replace("--health-probe-interval", "`--health-probe-interval`");
            assert!(row.contains(&range), "README row for {flag} lacks {range}");
        }
    }

    #[test]
    fn relations_are_checked_together() {
        let err = load(&[
            "--health-probe-interval",
            "1s",
            "--health-probe-timeout",
            "1s",
        ])
        .expect_err("timeout = interval");
        assert!(err.line.contains("HEALTH_PROBE_TIMEOUT"), "{err}");
        assert!(
            load(&[
                "--health-probe-interval",
                "1s",
                "--health-probe-timeout",
                "999ms"
            ])
            .is_ok()
        );
        assert!(load(&["--metrics-addr", "127.0.0.1:50051"]).is_err());
        assert!(load(&["--health-listen-addr", "0.0.0.0:50051"]).is_err());
        assert!(
            load(&[
                "--metrics-addr",
                "127.0.0.1:0",
                "--health-listen-addr",
                "127.0.0.1:0"
            ])
            .is_ok()
        );
    }

    #[test]
    fn unusable_database_urls_are_refused_without_their_password() {
        for (url, says) in [
            ("foo://app:s3cret@bar/db", "unsupported scheme"),
            ("postgres://app:s3cret@db:99999/x", "not a URL"),
            (
                "sqlite:///nonexistent/dir/x.db?mode=rwc",
                "/nonexistent/dir",
            ),
        ] {
            let err = load(&["--database-url", url]).expect_err(url);
            assert!(err.line.contains(says), "{err}");
            assert!(!err.line.contains("s3cret"), "{err}");
        }
        assert!(load(&["--database-url", "sqlite::memory:"]).is_ok());
        assert!(load(&["--database-url", "sqlite://?mode=memory"]).is_ok());
        assert!(load(&["--database-url", "postgres://app:pw@127.0.0.1:1/db"]).is_ok());
    }

    #[test]
    fn plaintext_off_loopback_needs_explicit_consent() {
        let parse = |args: &[&str]| load(args).expect("flags parse").settings;
        assert!(
            parse(&["--listen-addr", "0.0.0.0:50051"])
                .check_transport()
                .is_err()
        );
        assert!(
            parse(&[
                "--listen-addr",
                "0.0.0.0:50051",
                "--allow-insecure-plaintext",
                "true"
            ])
            .check_transport()
            .is_ok()
        );
        assert!(
            parse(&[
                "--listen-addr",
                "0.0.0.0:50051",
                "--tls-cert-file",
                "c.pem",
                "--tls-key-file",
                "k.pem"
            ])
            .check_transport()
            .is_ok()
        );
    }
}

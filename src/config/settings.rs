//! The settings of `serve` (and those `migrate` and `import` share), as
//! clap arguments with their defaults and ranges, and the checks between
//! them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::{Cli, DatabaseUrl, command};
use crate::mapping::IdempotencyNamespace;

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
    use super::{KUBERNETES_GRACE_PERIOD, ms, secs};
    use crate::config::Bounded;
    use std::time::Duration;

    /// PostgreSQL's own default `max_connections` is 100; ten times that is
    /// beyond any single replica's need.
    pub const DATABASE_MAX_CONNECTIONS: Bounded<u32> = Bounded::new(1, 1000);
    pub const DATABASE_ACQUIRE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const DATABASE_CONNECT_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const DATABASE_STALL_TIMEOUT: Bounded<Duration> = Bounded::new(ms(1), secs(60));
    pub const SQLITE_BUSY_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const HEALTH_PROBE_INTERVAL: Bounded<Duration> = Bounded::new(ms(10), secs(600));
    /// Also shorter than the probe interval, or checks overlap.
    pub const HEALTH_PROBE_TIMEOUT: Bounded<Duration> =
        Bounded::new(ms(10), secs(600)).below("--health-probe-interval");
    /// The drain, then closing the pool (up to 2 s), then the exit, inside
    /// the grace period, with a few seconds to spare.
    pub const SHUTDOWN_DRAIN_TIMEOUT: Bounded<Duration> = Bounded::new(
        secs(1),
        Duration::from_secs(KUBERNETES_GRACE_PERIOD.as_secs() - 5),
    );
    /// gRPC's customary 4 MiB message limit; at least the largest valid
    /// request (see the default).
    pub const MAX_REQUEST_BYTES: Bounded<usize> = Bounded::new(1, 4 * 1024 * 1024);
    pub const MAX_CONCURRENT_STREAMS: Bounded<u32> = Bounded::new(1, 10_000);
    pub const MAX_CONCURRENT_REQUESTS: Bounded<usize> = Bounded::new(1, 100_000);
    pub const MAX_CONNECTIONS: Bounded<usize> = Bounded::new(1, 100_000);
    pub const DEFAULT_DEADLINE: Bounded<Duration> = Bounded::new(ms(10), secs(300));
    pub const HANDSHAKE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(60));
    pub const HTTP2_KEEPALIVE_INTERVAL: Bounded<Duration> = Bounded::new(ms(10), secs(3600));
    pub const HTTP2_KEEPALIVE_TIMEOUT: Bounded<Duration> = Bounded::new(ms(10), secs(300));
    pub const MAX_WATCHERS: Bounded<usize> = Bounded::new(1, 100_000);
    pub const WATCH_BOOKMARK_INTERVAL: Bounded<Duration> = Bounded::new(ms(100), secs(60));
    pub const WATCH_POLL_INTERVAL: Bounded<Duration> = Bounded::new(ms(10), secs(10));
    /// PostgreSQL takes a batch as three arrays, whatever its size; ten
    /// thousand rows is a statement of about a megabyte.
    pub const IMPORT_BATCH_ROWS: Bounded<usize> = Bounded::new(1, 10_000);
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to serve gRPC on. Use 0.0.0.0:50051 in a container.
    #[arg(
        long,
        env = "LISTEN_ADDR",
        default_value = "127.0.0.1:50051",
        value_parser = host_port,
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

    #[command(flatten)]
    pub watch: WatchSettings,

    /// Address to serve Prometheus metrics on (`/metrics`); off when unset.
    #[arg(long, env = "METRICS_ADDR", value_parser = host_port, global = true)]
    pub metrics_addr: Option<SocketAddr>,

    /// On SIGTERM/SIGINT, how long in-flight RPCs may take to finish before
    /// they are cut off.
    #[arg(long, env = "SHUTDOWN_DRAIN_TIMEOUT", default_value = "20s", value_parser = bounds::SHUTDOWN_DRAIN_TIMEOUT, global = true)]
    pub shutdown_drain_timeout: Duration,

    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export traces to, in plaintext (e.g.
    /// http://127.0.0.1:4317);
    /// no traces are made when unset. The other standard OTEL_* variables
    /// (OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...) are read as the
    /// OpenTelemetry SDK defines them.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = otlp_endpoint, global = true)]
    pub otlp_endpoint: Option<url::Url>,

    /// Makes PrepareLink's idempotency keys this deployment's own, for
    /// example `billing-live`: 1 to 255 characters, no whitespace or
    /// control characters. Unset: a random one, made when the database was
    /// first used. Changing it changes every key: a customer prepared but
    /// not yet linked is then created again.
    #[arg(long, env = "STRIPE_IDEMPOTENCY_NAMESPACE", value_parser = idempotency_namespace, global = true)]
    pub stripe_idempotency_namespace: Option<IdempotencyNamespace>,
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

    /// Apply pending migrations when `serve` starts. Turn off when
    /// `customer-mapping migrate` runs before it (deploy/kubernetes: an init
    /// container).
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
    #[arg(long, env = "HEALTH_LISTEN_ADDR", value_parser = host_port, global = true)]
    pub health_listen_addr: Option<SocketAddr>,
}

/// 2 MiB: the contract's largest valid request, a BatchGet of 1,000 user
/// ids of 255 four-byte characters, each in a connected account of the
/// longest id, is 1,284,000 bytes (`grpc::limits::largest_valid_request`).
/// Any less and a caller keeping to the contract would be refused by a
/// limit it was never told of.
const MAX_REQUEST_BYTES_DEFAULT: usize = 2 * 1024 * 1024;

/// Bounds on what one caller, one connection or the whole server can make
/// the service hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct LimitSettings {
    /// Largest request message accepted, in bytes; larger ones get
    /// RESOURCE_EXHAUSTED before any work is done.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = MAX_REQUEST_BYTES_DEFAULT, value_parser = bounds::MAX_REQUEST_BYTES, global = true)]
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

/// Watch: how many streams, how often they hear from an idle feed, and how
/// often the feed looks for changes made elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct WatchSettings {
    /// Most Watch streams open at once; further ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_WATCHERS", default_value = "1000", value_parser = bounds::MAX_WATCHERS, global = true)]
    pub max_watchers: usize,

    /// Longest a Watch stream goes without a response: an idle one gets a
    /// bookmark (no events, the current cursor) this often.
    #[arg(long, env = "WATCH_BOOKMARK_INTERVAL", default_value = "10s", value_parser = bounds::WATCH_BOOKMARK_INTERVAL, global = true)]
    pub watch_bookmark_interval: Duration,

    /// How often the feed reads the changes made through other replicas and
    /// by `import` (changes made through this replica are read at once).
    #[arg(long, env = "WATCH_POLL_INTERVAL", default_value = "100ms", value_parser = bounds::WATCH_POLL_INTERVAL, global = true)]
    pub watch_poll_interval: Duration,
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
    pub(super) fn check_relations(&self) -> Result<(), String> {
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
/// A listening address, `HOST:PORT`: an IP address, or a host name
/// resolved once, here, to its first address (one socket is bound).
fn host_port(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = raw.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Err("not an address: expected HOST:PORT".into());
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("the port {port:?} is not a number from 0 to 65535"));
    }
    let mut addrs = std::net::ToSocketAddrs::to_socket_addrs(raw)
        .map_err(|err| format!("cannot resolve {host:?}: {err}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// An `http://` URL with a host: what the OTLP/gRPC exporter can connect
/// to (it says nothing about a malformed one until it exports). Spans go in
/// plaintext, to a collector beside the server (a node agent or a
/// sidecar): the exporter is built without TLS, so `https://` is refused
/// here rather than failing every export.
fn otlp_endpoint(raw: &str) -> Result<url::Url, String> {
    const EXPECTED: &str = "expected an http:// URL with a host, e.g. http://127.0.0.1:4317 \
                            (OTLP/gRPC in plaintext)";
    match url::Url::parse(raw) {
        Ok(url) if url.scheme() == "http" && url.host_str().is_some_and(|h| !h.is_empty()) => {
            Ok(url)
        }
        Ok(_) => Err(EXPECTED.into()),
        Err(err) => Err(format!("not a URL ({err}): {EXPECTED}")),
    }
}

fn idempotency_namespace(raw: &str) -> Result<IdempotencyNamespace, String> {
    let chars = raw.chars().count();
    if !(1..=255).contains(&chars) || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "expected 1 to 255 characters without whitespace or control characters, got {chars} \
             characters"
        ));
    }
    Ok(IdempotencyNamespace::new(raw))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{database_url::DATABASE_URL_DEFAULT, tests::load};

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
        assert_eq!(settings.limits.max_request_bytes, 2 * 1024 * 1024);
        assert_eq!(settings.health.health_probe_interval, secs(5));
        assert!(settings.access.reflection);
        assert!(settings.check_transport().is_ok());
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

    #[test]
    fn the_default_request_size_admits_the_largest_valid_request() {
        use prost::Message;
        let largest = crate::grpc::limits::largest_valid_request();
        let keys = &largest.keys;
        assert_eq!(keys.len(), crate::mapping::MAX_BATCH_KEYS);
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len());
        let size = largest.encoded_len();
        assert_eq!(size, 1_284_000, "the figure the comments give");
        assert!(Settings::defaults().limits.max_request_bytes >= size);
        assert!(bounds::MAX_REQUEST_BYTES.max >= size);
    }
}

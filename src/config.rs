//! All configuration, parsed once at start from flags and environment.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
    #[arg(long, env = "SHUTDOWN_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_drain_timeout: Duration,

    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// PostgreSQL (`postgres://user:password@host/db`) or SQLite
    /// (`sqlite://file.db?mode=rwc`) connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://customer-mapping.db?mode=rwc",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// File holding the connection URL (a mounted Kubernetes secret), read
    /// once at start; trailing whitespace is ignored.
    #[arg(
        long,
        env = "DATABASE_URL_FILE",
        conflicts_with = "database_url",
        global = true
    )]
    pub database_url_file: Option<PathBuf>,

    /// Most connections the pool opens.
    #[arg(
        long,
        env = "DATABASE_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub database_max_connections: u32,

    /// How long a request waits for a free connection before UNAVAILABLE.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub database_acquire_timeout: Duration,

    /// How long opening one database connection may take.
    #[arg(long, env = "DATABASE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub database_connect_timeout: Duration,

    /// SQLite only: how long a write waits for another writer.
    #[arg(long, env = "SQLITE_BUSY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
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
    #[arg(long, env = "HEALTH_PROBE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub health_probe_interval: Duration,

    /// How long one database check may take before it counts as failed.
    #[arg(long, env = "HEALTH_PROBE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub health_probe_timeout: Duration,
}

/// Transport security. With neither file set the server speaks plaintext,
/// which it only does on a loopback address unless
/// `--allow-insecure-plaintext` says otherwise.
#[derive(Debug, Clone, Default, Args)]
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

impl Default for AccessSettings {
    fn default() -> Self {
        Self {
            policy_file: None,
            reflection: true,
            health_listen_addr: None,
        }
    }
}

/// Bounds on what one caller, one connection or the whole server can make
/// the service hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct LimitSettings {
    /// Largest request message accepted, in bytes; larger ones get
    /// RESOURCE_EXHAUSTED before any work is done.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value_t = 16 * 1024, global = true)]
    pub max_request_bytes: usize,

    /// Most RPCs one HTTP/2 connection may have open at once (advertised to
    /// the client, which queues the rest).
    #[arg(
        long,
        env = "MAX_CONCURRENT_STREAMS",
        default_value_t = 128,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// Most CustomerMapping RPCs in progress over all connections; beyond it
    /// calls are shed at once with UNAVAILABLE instead of queueing.
    #[arg(
        long,
        env = "MAX_CONCURRENT_REQUESTS",
        default_value_t = 512,
        global = true
    )]
    pub max_concurrent_requests: usize,

    /// Most open client connections; further ones are closed at once.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, global = true)]
    pub max_connections: usize,

    /// Deadline of a call whose caller set none (or a longer one).
    #[arg(long, env = "DEFAULT_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub default_deadline: Duration,

    /// How long a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 preface before it is closed (slow-loris defence).
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub handshake_timeout: Duration,

    /// How often an idle connection is pinged (HTTP/2 PING).
    #[arg(long, env = "HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is dropped.
    #[arg(long, env = "HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub http2_keepalive_timeout: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 * 1024,
            max_concurrent_streams: 128,
            max_concurrent_requests: 512,
            max_connections: 4096,
            default_deadline: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Reads what the settings point to in files (today: the database URL).
    /// Call once, before anything uses the settings.
    pub fn load_secrets(&mut self) -> anyhow::Result<()> {
        if let Some(path) = self.database.database_url_file.take() {
            let raw = std::fs::read_to_string(&path)
                .with_context(|| format!("reading DATABASE_URL_FILE {}", path.display()))?;
            let url = raw.trim_end();
            anyhow::ensure!(
                !url.is_empty(),
                "DATABASE_URL_FILE {} is empty",
                path.display()
            );
            self.database.database_url = url.to_owned();
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl DatabaseSettings {
    /// Settings for a URL with everything else at its default (tests use it).
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            database_url: url.into(),
            database_url_file: None,
            database_max_connections: 10,
            database_acquire_timeout: Duration::from_secs(5),
            database_connect_timeout: Duration::from_secs(5),
            sqlite_busy_timeout: Duration::from_secs(5),
            migrate_on_start: true,
        }
    }

    pub fn pool_options(&self) -> crate::store::PoolOptions {
        crate::store::PoolOptions {
            max_connections: self.database_max_connections,
            acquire_timeout: self.database_acquire_timeout,
            connect_timeout: self.database_connect_timeout,
            sqlite_busy_timeout: self.sqlite_busy_timeout,
        }
    }

    /// The URL without its password, safe for a log line.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
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
        let cli = Cli::try_parse_from(["customer-mapping"]).expect("defaults parse");
        assert!(cli.command.is_none());
        assert_eq!(cli.settings.listen_addr.to_string(), "127.0.0.1:50051");
        assert!(cli.settings.database.database_url.starts_with("sqlite://"));
        assert!(cli.settings.database.migrate_on_start);
        assert_eq!(cli.settings.limits, LimitSettings::default());
        assert!(cli.settings.access.reflection);
        assert!(cli.settings.check_transport().is_ok());
    }

    #[test]
    fn plaintext_off_loopback_needs_explicit_consent() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["customer-mapping"], args].concat())
                .expect("flags parse")
                .settings
        };
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

//! All configuration, parsed once at start from flags and environment.

use std::{net::SocketAddr, time::Duration};

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
    }
}

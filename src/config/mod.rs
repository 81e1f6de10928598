//! All configuration, parsed once at start from flags and environment into a
//! complete, checked [`Settings`] before anything binds or connects.
//!
//! Every default is written once, in the clap attributes (`settings.rs`,
//! `import.rs`); tests get them from [`Settings::defaults`]. Every number
//! has a [`Bounded`] range (`bounded.rs`), enforced while parsing and shown
//! by `--help`. A refused value is one line naming the flag, its environment
//! variable, the value and the range ([`Cli::load`] prints it and exits with
//! status 2; `error.rs` renders clap's own refusals so). The database URL,
//! a secret checked against the filesystem, is `database_url.rs`.

mod bounded;
mod database_url;
mod error;
mod import;
mod settings;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use bounded::{Bounded, Quantity};
pub use database_url::{DatabaseUrl, redact_url};
pub use error::ConfigError;
pub use import::{ImportArgs, SourceUrl};
pub use settings::{
    AccessSettings, DatabaseSettings, HealthSettings, KUBERNETES_GRACE_PERIOD, LimitSettings,
    LogFormat, Settings, TlsSettings, bounds,
};

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

/// Exit status of a refused configuration (clap's own, for usage errors).
pub const CONFIG_ERROR_EXIT: u8 = 2;

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
        let matches = command
            .try_get_matches_from_mut(args)
            .map_err(|e| ConfigError::refused(e, &command))?;
        let cli =
            Self::from_arg_matches(&matches).map_err(|e| ConfigError::refused(e, &command))?;
        cli.settings.check_relations().map_err(ConfigError::line)?;
        Ok(cli)
    }
}

/// The clap command, each ranged argument's help ending with its range as
/// its own value parser states it (so a range is written once, in
/// `bounds`).
pub fn command() -> clap::Command {
    with_ranges(Cli::command())
}

fn with_ranges(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| match bounded::range_of(&arg) {
            Some(range) => with_range_in_help(arg, &range),
            None => arg,
        })
        .mut_subcommands(with_ranges)
}

fn with_range_in_help(arg: clap::Arg, range: &str) -> clap::Arg {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let long_help = arg.get_long_help().map(ToString::to_string);
    let arg = arg.help(format!("{help} [range: {range}]"));
    match long_help {
        Some(long) => arg.long_help(format!("{long}\n\n[range: {range}]")),
        None => arg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `args` parsed as the command line, ignoring this process' environment.
    pub(super) fn load(args: &[&str]) -> Result<Cli, ConfigError> {
        let without_env = command().mut_args(|arg| arg.env(None));
        Cli::load_with(without_env, [&["customer-mapping"], args].concat())
    }

    /// Every argument, with the subcommand it belongs to (`None`: the top
    /// level, where the settings are) and its range, if it has one.
    fn arguments(command: &clap::Command) -> Vec<(Option<&str>, &clap::Arg, Option<String>)> {
        let top = command.get_arguments().map(|arg| (None, arg));
        let nested = command.get_subcommands().flat_map(|sub| {
            sub.get_arguments()
                .map(move |arg| (Some(sub.get_name()), arg))
        });
        top.chain(nested)
            .map(|(sub, arg)| (sub, arg, bounded::range_of(arg)))
            .collect()
    }

    fn long_flag(arg: &clap::Arg) -> String {
        format!("--{}", arg.get_long().expect("a long flag"))
    }

    #[test]
    fn every_range_is_enforced_as_help_says() {
        let command = command();
        for (sub, arg, range) in arguments(&command) {
            let Some(range) = range else { continue };
            let help = arg.get_help().expect("help").to_string();
            assert!(help.contains(&format!("[range: {range}]")), "{help}");
            let flag = long_flag(arg);
            for refused in ["0", "0s", "99999999999h", "99999999999999999999"] {
                // The flag wins over the environment; the line names both.
                let args = ["customer-mapping"].into_iter().chain(sub);
                let err = Cli::try_load_from(args.chain([flag.as_str(), refused]))
                    .expect_err(&format!("{flag} {refused}"));
                if let Some(env) = arg.get_env() {
                    assert!(err.line.contains(env.to_string_lossy().as_ref()), "{err}");
                }
                assert!(err.line.contains(&flag), "{err}");
                assert!(err.line.contains(refused), "{err}");
                // The range shown is the one the parser enforces.
                let bound = range.split(',').next().expect("a range");
                assert!(err.line.contains(&format!("allowed {bound}")), "{err}");
                assert!(!err.line.contains('\n'), "{err}");
            }
        }
    }

    #[test]
    fn every_number_has_a_range() {
        // Addresses, files, names, switches and the log format have none.
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
            "csv",
            "from_database_url",
            "table",
            "user_column",
            "customer_column",
            "created_at_column",
            "report",
            "dry_run",
            "help",
            "version",
        ];
        let command = command();
        let arguments = arguments(&command);
        for (_, arg, range) in &arguments {
            let id = arg.get_id().as_str();
            assert!(
                range.is_some() || unranged.contains(&id),
                "{id}: give it a range in config::bounds"
            );
        }
    }

    #[test]
    fn the_readme_shows_every_range() {
        let readme = include_str!("../../README.md");
        let command = command();
        for (_, arg, range) in arguments(&command) {
            let Some(range) = range else { continue };
            let flag = format!("`{}`", long_flag(arg));
            let row = readme
                .lines()
                .map(str::trim_start)
                .find(|l| l.starts_with(&format!("| {flag}")))
                .unwrap_or_else(|| panic!("no README row for {flag}"));
            // The README quotes flags.
            let range: Vec<String> = range
                .split(' ')
                .map(|w| match w.starts_with("--") {
                    true => format!("`{w}`"),
                    false => w.to_owned(),
                })
                .collect();
            let range = range.join(" ");
            assert!(row.contains(&range), "README row for {flag} lacks {range}");
        }
    }
}

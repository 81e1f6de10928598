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

use clap::{
    Arg, Args, CommandFactory, FromArgMatches, Parser, Subcommand, builder::TypedValueParser,
    error::ErrorKind,
};

pub use bounded::{Bounded, Quantity};
pub use database_url::{DatabaseUrl, redact_url};
pub use error::ConfigError;
pub use import::{ImportArgs, SourceUrl};
pub use settings::{
    AccessSettings, DatabaseSettings, HealthSettings, KUBERNETES_GRACE_PERIOD, LimitSettings,
    LogFormat, Settings, TlsSettings, WatchSettings, bounds,
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
    /// Apply pending database migrations and exit (for an init container).
    Migrate(MigrateArgs),
    /// Bring existing mappings in, with Link's rules: from a CSV file or
    /// from the replaced application's own PostgreSQL table. Exits 0 when
    /// no row was refused, 1 when some were, 2 on bad arguments or an
    /// unreadable source, 3 when the target database failed, 130 when
    /// interrupted.
    Import(Box<ImportArgs>),
}

/// What `migrate` does besides applying the pending migrations.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MigrateArgs {
    /// The upgrade's last step on PostgreSQL, once every replica runs this
    /// release: lets mappings of connected Stripe accounts be written, by
    /// dropping the previous release's uniqueness of users and customers
    /// across accounts. No replica of an earlier release may serve the
    /// database afterwards (README, "Upgrading").
    #[arg(long)]
    pub enable_stripe_accounts: bool,
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
        if let Some(Command::Import(_)) = cli.command {
            database_url::check_named(&matches).map_err(ConfigError::line)?;
        }
        Ok(cli)
    }
}

/// The clap command: each ranged argument's help ends with its range as
/// its own value parser states it (so a range is written once, in
/// `bounds`), and `migrate` and `import` take only the settings they use.
pub fn command() -> clap::Command {
    serve_only_settings_refused_elsewhere(with_ranges(Cli::command()))
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

/// The settings are global, so that they may come before or after `serve`
/// or no subcommand at all. A subcommand that has an argument of a global's
/// name does not get the global, so `migrate` and `import` are given, for
/// each setting only `serve` uses, a hidden one that refuses it: their
/// help shows what they read, and a serving flag after them is an error,
/// not silently ignored. (Before the subcommand it is parsed, checked and
/// ignored, as the environment's variables are.)
fn serve_only_settings_refused_elsewhere(command: clap::Command) -> clap::Command {
    let serve_only: Vec<Arg> = command
        .get_arguments()
        .filter(|arg| arg.is_global_set() && !shared(arg.get_id().as_str()))
        .map(refused_here)
        .collect();
    command.mut_subcommands(|sub| match sub.get_name() {
        "serve" => sub,
        _ => sub.args(serve_only.iter().cloned()),
    })
}

/// What `migrate` and `import` read besides their own arguments: the
/// database settings (except whether `serve` migrates) and the log format.
fn shared(id: &str) -> bool {
    let database = DatabaseSettings::augment_args(clap::Command::new("database"));
    id == "log_format"
        || (id != "migrate_on_start" && database.get_arguments().any(|arg| arg.get_id() == id))
}

/// `arg`, hidden, from the command line only, refusing any value.
fn refused_here(arg: &Arg) -> Arg {
    arg.clone()
        .global(false)
        .hide(true)
        .env(None)
        .default_value(None)
        .requires(clap::builder::Resettable::Reset)
        .conflicts_with(clap::builder::Resettable::Reset)
        .action(clap::ArgAction::Set)
        .num_args(0..=1)
        .default_missing_value("")
        .value_parser(ServeOnly)
}

/// The value parser of a serving setting given to another subcommand.
#[derive(Clone)]
struct ServeOnly;

impl TypedValueParser for ServeOnly {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&Arg>,
        _value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let flag = arg.and_then(Arg::get_long).unwrap_or_default();
        Err(clap::Error::raw(
            ErrorKind::ArgumentConflict,
            format!(
                "--{flag} is a setting of `serve`; `{}` does not use it",
                cmd.get_name()
            ),
        ))
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
        // Hidden: a serving setting refused by another subcommand.
        top.chain(nested)
            .filter(|(_, arg)| !arg.is_hide_set())
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
            "otlp_endpoint",
            "stripe_idempotency_namespace",
            "enable_stripe_accounts",
            "csv",
            "from_database_url",
            "table",
            "user_column",
            "customer_column",
            "created_at_column",
            "account_column",
            "stripe_account",
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

    fn help_of(subcommand: &str) -> String {
        let mut command = command();
        command.build();
        let sub = command
            .find_subcommand_mut(subcommand)
            .expect("a subcommand");
        sub.render_long_help().to_string()
    }

    #[test]
    fn migrate_and_import_show_only_the_settings_they_use() {
        for subcommand in ["migrate", "import"] {
            let help = help_of(subcommand);
            for used in [
                "--database-url ",
                "--database-connect-timeout",
                "--log-format",
            ] {
                assert!(help.contains(used), "{subcommand} lacks {used}: {help}");
            }
            for unused in [
                "--listen-addr",
                "--migrate-on-start",
                "--max-request-bytes",
                "--tls",
            ] {
                assert!(
                    !help.contains(unused),
                    "{subcommand} shows {unused}: {help}"
                );
            }
        }
        let serve = help_of("serve");
        for used in [
            "--listen-addr",
            "--migrate-on-start",
            "--database-url ",
            "--log-format",
        ] {
            assert!(serve.contains(used), "serve lacks {used}");
        }
    }

    #[test]
    fn listening_addresses_take_host_names() {
        let cli = load(&["--listen-addr", "localhost:50083"]).expect("a host name");
        assert!(cli.settings.listen_addr.ip().is_loopback());
        assert_eq!(cli.settings.listen_addr.port(), 50083);
        for (addr, why) in [
            ("localhost", "expected HOST:PORT"),
            ("localhost:http", "is not a number"),
            ("no-such-host.invalid:1", "cannot resolve"),
        ] {
            let err = load(&["--metrics-addr", addr]).expect_err(addr);
            assert!(err.line.contains(why), "{err}");
        }
    }

    #[test]
    fn a_mistyped_flag_or_subcommand_gets_a_suggestion() {
        for (args, similar) in [
            (&["--listen-adr", "127.0.0.1:1"][..], "--listen-addr"),
            (&["import", "--dry-rn"], "--dry-run"),
            (&["sreve"], "serve"),
        ] {
            let err = load(args).expect_err("refused");
            assert!(
                err.line.ends_with(&format!("; did you mean '{similar}'?")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_serving_setting_after_another_subcommand_is_refused() {
        for args in [
            &["migrate", "--listen-addr", "127.0.0.1:1"][..],
            &["import", "--csv", "m.csv", "--max-request-bytes", "100"],
            &["migrate", "--migrate-on-start"],
        ] {
            let err = load(args).expect_err("refused");
            assert!(err.line.contains("is a setting of `serve`"), "{err}");
            assert!(err.line.contains(&format!("`{}`", args[0])), "{err}");
        }
    }

    #[test]
    fn serving_settings_go_before_or_after_serve_or_without_it() {
        let addr = "127.0.0.1:1234";
        for args in [
            &["--listen-addr", addr][..],
            &["serve", "--listen-addr", addr],
            &["--listen-addr", addr, "serve"],
            // Parsed and ignored, as before.
            &["--listen-addr", addr, "migrate"],
        ] {
            let cli = load(args).unwrap_or_else(|err| panic!("{args:?}: {err}"));
            assert_eq!(cli.settings.listen_addr.to_string(), addr, "{args:?}");
        }
        let cli = load(&[
            "--max-request-bytes",
            "5",
            "serve",
            "--max-request-bytes",
            "7",
        ])
        .expect("parses");
        assert_eq!(cli.settings.limits.max_request_bytes, 7, "the later wins");
    }
}

//! The database connection URL: a secret, read from a flag, the
//! environment or a mounted file, and checked against the filesystem
//! before anything connects.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use clap::{Arg, ArgMatches, Args, FromArgMatches, error::ErrorKind, parser::ValueSource};
use secrecy::{ExposeSecret, SecretString};

pub(super) const DATABASE_URL_DEFAULT: &str = "sqlite://customer-mapping.db?mode=rwc";

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
                // Without a mode SQLite does not create the file, and the
                // server would wait for it forever: create it, as the
                // default URL says to.
                if !params.contains_key("mode") && name != ":memory:" {
                    let separator = if raw.contains('?') { '&' } else { '?' };
                    return Ok(Self(format!("{raw}{separator}mode=rwc").into()));
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

    pub(super) fn into_secret(self) -> SecretString {
        self.0
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
                     (`sqlite://file.db`, created if missing unless a `mode` says \
                     otherwise) connection URL",
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

/// The import writes into its target, and the default is a new SQLite
/// file in the working directory, which no one means to import into: the
/// target must be named.
pub(super) fn check_named(matches: &ArgMatches) -> Result<(), String> {
    let named = matches.contains_id(URL_FILE_ARG)
        || matches
            .value_source(URL_ARG)
            .is_some_and(|source| source != ValueSource::DefaultValue);
    if named {
        return Ok(());
    }
    Err(
        "import needs its target database: set DATABASE_URL (or --database-url, \
         or DATABASE_URL_FILE) to the service's database"
            .to_owned(),
    )
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
    use crate::config::tests::load;

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
    fn an_import_needs_its_target_named() {
        let err = load(&["import", "--csv", "m.csv"]).expect_err("no target");
        assert!(err.line.contains("set DATABASE_URL"), "{err}");
        let named = load(&[
            "import",
            "--csv",
            "m.csv",
            "--database-url",
            "sqlite::memory:",
        ]);
        assert!(named.is_ok(), "{named:?}");
        let before = load(&[
            "--database-url",
            "sqlite::memory:",
            "import",
            "--csv",
            "m.csv",
        ]);
        assert!(before.is_ok(), "{before:?}");
        // Serving and migrating keep their default.
        assert!(load(&["migrate"]).is_ok());
        assert!(load(&[]).is_ok());
    }

    #[test]
    fn a_sqlite_file_without_a_mode_is_created() {
        for (given, used) in [
            ("sqlite://x.db", "sqlite://x.db?mode=rwc"),
            ("sqlite:rel.db", "sqlite:rel.db?mode=rwc"),
            (
                "sqlite://x.db?cache=shared",
                "sqlite://x.db?cache=shared&mode=rwc",
            ),
            ("sqlite://x.db?mode=rwc", "sqlite://x.db?mode=rwc"),
            ("sqlite://x.db?mode=ro", "sqlite://x.db?mode=ro"),
            ("sqlite://?mode=memory", "sqlite://?mode=memory"),
            ("sqlite::memory:", "sqlite::memory:"),
        ] {
            let url = DatabaseUrl::parse(given).expect(given);
            assert_eq!(url.expose_secret(), used);
        }
    }
}

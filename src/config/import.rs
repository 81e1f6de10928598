//! The `import` subcommand's own arguments.

use std::{fmt, path::PathBuf};

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use super::{DatabaseUrl, bounds};
use crate::mapping::StripeAccount;

/// `customer-mapping import`. The target is `DATABASE_URL`, as for
/// `migrate`, but never its default (`Cli::load` refuses to import without
/// one named).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Import", group(
    clap::ArgGroup::new("source").required(true).args(["csv", "from_database_url"])
))]
pub struct ImportArgs {
    /// A CSV file with the header `user_id,stripe_customer_id`, optionally
    /// `created_at` (RFC 3339), and the `--account-column` if given.
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
    /// Its rows are read oldest first by the time column (ties in primary-key
    /// order); a table without one, in primary-key order; a table without
    /// either, by user id, then customer id. Of two rows that contradict each
    /// other, the first read is imported and the other refused.
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

    /// The Stripe account every row belongs to: `acct_...` (a connected
    /// account), or empty for the platform's own account.
    #[arg(long, value_name = "ACCOUNT", default_value = "", value_parser = parse_account)]
    pub stripe_account: StripeAccount,

    /// The column (of the CSV file or of `--table`) holding each row's
    /// Stripe account: `acct_...`, or empty (or NULL) for the platform's
    /// own account.
    #[arg(long, value_name = "COLUMN", conflicts_with = "stripe_account")]
    pub account_column: Option<String>,

    /// Write one CSV line per refused row here: where it was, both ids, the
    /// reason and the mapping that holds the user or the customer.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,

    /// Read, check and report everything, and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Rows per database statement.
    #[arg(long, value_name = "ROWS", default_value = "5000", value_parser = bounds::IMPORT_BATCH_ROWS)]
    pub batch_rows: usize,
}

fn parse_account(raw: &str) -> Result<StripeAccount, String> {
    StripeAccount::parse(raw).map_err(|invalid| invalid.to_string())
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
        DatabaseUrl::parse(raw).map(|url| Self(url.into_secret()))
    }

    /// The URL itself, password included: only to connect with.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

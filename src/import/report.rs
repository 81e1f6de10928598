//! `--report PATH`: one CSV line per refused row, written as rows are
//! decided and flushed after every batch, so an interrupted import's
//! report holds every refusal it counted.

use std::{
    fs::File,
    io::BufWriter,
    path::{Path, PathBuf},
};

use super::Refusal;

pub struct Report {
    out: Option<(PathBuf, csv::Writer<BufWriter<File>>)>,
    /// Whether rows name their own account (`--account-column`): then the
    /// report has a `stripe_account` column.
    with_account: bool,
}

impl Report {
    /// Creates (or truncates) the report; `position` names the first
    /// column (`line` for a CSV source, `row` for a table).
    pub fn create(path: Option<&Path>, position: &str, with_account: bool) -> Result<Self, String> {
        let Some(path) = path else {
            return Ok(Self {
                out: None,
                with_account,
            });
        };
        let cannot = |err: &dyn std::fmt::Display| {
            format!("cannot write the report {}: {err}", path.display())
        };
        let file = File::create(path).map_err(|e| cannot(&e))?;
        let mut out = csv::Writer::from_writer(BufWriter::new(file));
        let account = with_account.then_some("stripe_account");
        let header = [position, "user_id", "stripe_customer_id"]
            .into_iter()
            .chain(account)
            .chain([
                "reason",
                "existing_user_id",
                "existing_stripe_customer_id",
                "detail",
            ]);
        out.write_record(header).map_err(|e| cannot(&e))?;
        out.flush().map_err(|e| cannot(&e))?;
        Ok(Self {
            out: Some((path.to_owned(), out)),
            with_account,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.out.as_ref().map(|(path, _)| path.as_path())
    }

    pub fn write(&mut self, refusal: &Refusal) -> Result<(), String> {
        let Some((path, out)) = &mut self.out else {
            return Ok(());
        };
        let (existing_user, existing_customer) = refusal
            .existing
            .as_ref()
            .map_or(("", ""), |(u, c)| (u.as_str(), c.as_str()));
        let at = refusal.at.to_string();
        let account = self.with_account.then_some(refusal.stripe_account.as_str());
        let record = [at.as_str(), &refusal.user_id, &refusal.stripe_customer_id]
            .into_iter()
            .chain(account)
            .chain([
                refusal.reason.as_str(),
                existing_user,
                existing_customer,
                &refusal.detail,
            ]);
        out.write_record(record)
            .map_err(|e| format!("cannot write the report {}: {e}", path.display()))
    }

    pub fn flush(&mut self) -> Result<(), String> {
        let Some((path, out)) = &mut self.out else {
            return Ok(());
        };
        out.flush()
            .map_err(|e| format!("cannot write the report {}: {e}", path.display()))
    }
}

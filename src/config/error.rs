//! clap's refusals re-rendered as the one line an operator reads.

use std::fmt;

use clap::{
    Arg,
    error::{ContextKind, ContextValue},
};

use super::CONFIG_ERROR_EXIT;

/// A configuration that cannot be used, as the one line to print; or
/// `--help`/`--version`, which clap prints.
#[derive(Debug)]
pub struct ConfigError {
    pub(super) line: String,
    clap: Option<clap::Error>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(super) fn line(line: impl Into<String>) -> Self {
        Self {
            line: line.into(),
            clap: None,
        }
    }

    /// clap's refusal of a command line, as one line.
    pub(super) fn refused(err: clap::Error, command: &clap::Command) -> Self {
        Self {
            line: one_line(&err, command),
            clap: Some(err),
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
    // clap's "a similar argument exists" tip is in a later paragraph.
    let similar = err
        .get(ContextKind::SuggestedArg)
        .or_else(|| err.get(ContextKind::SuggestedSubcommand));
    if let Some(similar) = similar {
        line.push_str(&format!("; did you mean '{similar}'?"));
    }
    line
}

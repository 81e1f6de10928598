//! The bounded-range value parser every numeric setting uses, and how
//! `--help` learns each argument's range from it.

use std::{fmt, marker::PhantomData, time::Duration};

use clap::{
    Arg,
    builder::TypedValueParser,
    error::{ContextKind, ContextValue, ErrorKind},
    parser::ValueSource,
};

/// The inclusive range a numeric setting accepts, and its value parser:
/// values outside are refused while parsing, with one line naming the flag,
/// its environment variable, the value and the range.
#[derive(Debug, Clone, Copy)]
pub struct Bounded<T> {
    pub min: T,
    pub max: T,
    /// The setting this one must stay below: checked with it once both are
    /// parsed (`Settings::check_relations`), named here for `--help`.
    below: Option<&'static str>,
    _unit: PhantomData<fn() -> T>,
}

impl<T: Copy> Bounded<T> {
    pub const fn new(min: T, max: T) -> Self {
        Self {
            min,
            max,
            below: None,
            _unit: PhantomData,
        }
    }

    /// The same range, shown as also below the setting `flag`.
    pub const fn below(self, flag: &'static str) -> Self {
        Self {
            below: Some(flag),
            ..self
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
    /// The range as `--help` shows it.
    fn described(&self) -> String {
        match self.below {
            Some(flag) => format!("{self}, below {flag}"),
            None => self.to_string(),
        }
    }

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
            let mut err = clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid {} \"{text}\": {why}", arg_names(arg, source)),
            );
            // What `range_of` reads.
            err.insert(
                ContextKind::ValidValue,
                ContextValue::String(self.described()),
            );
            err
        })
    }
}

/// The range `arg`'s value parser enforces, when it is a [`Bounded`]. clap
/// keeps a parser opaque, so it is asked: given an empty value, a `Bounded`
/// refuses it and names its range in the refusal (other parsers do not).
pub(super) fn range_of(arg: &Arg) -> Option<String> {
    let probe = Arg::new("probe")
        .long("probe")
        .value_parser(arg.get_value_parser().clone());
    let refusal = clap::Command::new("probe")
        .arg(probe)
        .try_get_matches_from(["probe", "--probe", ""])
        .err()?;
    match refusal.get(ContextKind::ValidValue) {
        Some(ContextValue::String(range)) if refusal.kind() == ErrorKind::ValueValidation => {
            Some(range.clone())
        }
        _ => None,
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

//! Validated identifiers. Parsing is the only way to build one, so an invalid
//! id cannot reach the store (parse, don't validate).

use std::fmt;

/// Longest id accepted on either side, in characters.
pub const MAX_ID_CHARS: usize = 255;

const STRIPE_CUSTOMER_PREFIX: &str = "cus_";
const STRIPE_ACCOUNT_PREFIX: &str = "acct_";

/// Why a raw id was refused, in words a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(String);

/// The caller's user id: 1 to 255 characters, no whitespace or control
/// characters; any other Unicode is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidId> {
        let raw = raw.into();
        let chars = raw.chars().count();
        if chars == 0 {
            return Err(InvalidId("must not be empty".into()));
        }
        if chars > MAX_ID_CHARS {
            return Err(InvalidId(format!(
                "must be at most {MAX_ID_CHARS} characters, got {chars}"
            )));
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidId(
                "must not contain whitespace or control characters".into(),
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A Stripe customer id: `cus_` followed by one or more ASCII letters or
/// digits, 255 characters at most.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StripeCustomerId(String);

impl StripeCustomerId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidId> {
        let raw = raw.into();
        let refuse = || {
            InvalidId(format!(
                "must be \"{STRIPE_CUSTOMER_PREFIX}\" followed by one or more ASCII letters or digits, \
                 {MAX_ID_CHARS} characters at most"
            ))
        };
        // All accepted characters are ASCII, so bytes are characters here.
        if raw.len() > MAX_ID_CHARS {
            return Err(refuse());
        }
        let rest = raw
            .strip_prefix(STRIPE_CUSTOMER_PREFIX)
            .ok_or_else(refuse)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(refuse());
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Stripe account a mapping belongs to: empty for the platform's own
/// account, otherwise a connected account's id, `acct_` followed by one or
/// more ASCII letters or digits, 255 characters at most. Customer ids are
/// only unique within an account, so every mapping belongs to one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StripeAccount(String);

impl StripeAccount {
    pub fn parse(raw: impl Into<String>) -> Result<Self, InvalidId> {
        let raw = raw.into();
        if raw.is_empty() {
            return Ok(Self::platform());
        }
        let refuse = || {
            InvalidId(format!(
                "must be empty (the platform's own account) or \"{STRIPE_ACCOUNT_PREFIX}\" \
                 followed by one or more ASCII letters or digits, {MAX_ID_CHARS} characters at most"
            ))
        };
        if raw.len() > MAX_ID_CHARS {
            return Err(refuse());
        }
        let rest = raw.strip_prefix(STRIPE_ACCOUNT_PREFIX).ok_or_else(refuse)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(refuse());
        }
        Ok(Self(raw))
    }

    /// The platform's own account: what a caller naming no account means.
    pub fn platform() -> Self {
        Self(String::new())
    }

    pub fn is_platform(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StripeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<StripeAccount> for String {
    fn from(id: StripeAccount) -> Self {
        id.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for StripeCustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> Self {
        id.0
    }
}

impl From<StripeCustomerId> for String {
    fn from(id: StripeCustomerId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_accepts_unicode_up_to_255_characters() {
        assert!(UserId::parse("user-1").is_ok());
        assert!(UserId::parse("ユーザー").is_ok());
        // 255 four-byte characters: the limit counts characters, not bytes.
        assert!(UserId::parse("😀".repeat(255)).is_ok());
        assert!(UserId::parse("a".repeat(255)).is_ok());
    }

    #[test]
    fn user_id_refuses_empty_long_whitespace_and_control() {
        for bad in [
            String::new(),
            "a".repeat(256),
            "😀".repeat(256),
            "a b".into(),
            "a\tb".into(),
            "a\u{00a0}b".into(), // no-break space
            "a\u{3000}b".into(), // ideographic space
            "a\0b".into(),
            "a\u{7f}".into(),
            "\u{85}".into(), // next line (C1 control)
        ] {
            assert!(UserId::parse(bad.clone()).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn stripe_customer_id_accepts_cus_and_alphanumerics() {
        assert!(StripeCustomerId::parse("cus_NffrFeUfNV2Hib").is_ok());
        assert!(StripeCustomerId::parse("cus_0").is_ok());
        assert!(StripeCustomerId::parse(format!("cus_{}", "a".repeat(251))).is_ok());
    }

    #[test]
    fn stripe_account_is_empty_or_acct_and_alphanumerics() {
        assert!(StripeAccount::parse("").is_ok_and(|a| a.is_platform()));
        assert!(StripeAccount::parse("acct_1Nv0FGQ9RKHgCVdK").is_ok());
        assert!(StripeAccount::parse(format!("acct_{}", "a".repeat(250))).is_ok());
        for bad in [
            "acct_".to_owned(),
            "acct".into(),
            "ACCT_abc".into(),
            "cus_abc".into(),
            " acct_abc".into(),
            "acct_a-b".into(),
            "acct_a_b".into(),
            "acct_é".into(),
            "acct_abc\0".into(),
            format!("acct_{}", "a".repeat(251)),
        ] {
            assert!(
                StripeAccount::parse(bad.clone()).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn stripe_customer_id_refuses_everything_else() {
        for bad in [
            String::new(),
            "cus_".into(),
            "cus".into(),
            "CUS_abc".into(),
            "acct_abc".into(),
            " cus_abc".into(),
            "cus_abc ".into(),
            "cus_a-b".into(),
            "cus_a_b".into(),
            "cus_é".into(),
            "cus_abc\0".into(),
            format!("cus_{}", "a".repeat(252)),
        ] {
            assert!(
                StripeCustomerId::parse(bad.clone()).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}

//! The policy file: who may call which RPC.
//!
//! ```json
//! {
//!   "callers": [
//!     { "name": "billing-webhooks",
//!       "certificate_names": ["webhooks.billing.svc.cluster.local"],
//!       "allow": ["Link", "Get"] },
//!     { "name": "support-admin",
//!       "token_sha256": "<64 hex digits: sha256 of the token>",
//!       "allow": ["Get", "Unlink"] }
//!   ]
//! }
//! ```

use std::{collections::HashSet, path::Path, sync::Arc};

use serde::Deserialize;

use super::Rpc;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading the policy file: {0}")]
    Read(#[from] std::io::Error),
    #[error("parsing the policy file: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("policy entry {name:?}: {problem}")]
    Invalid { name: String, problem: &'static str },
}

#[derive(Debug)]
pub(super) struct Policy {
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub name: Arc<str>,
    pub certificate_names: Vec<String>,
    pub token_sha256: Option<[u8; 32]>,
    pub allow: Vec<Rpc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    callers: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    #[serde(default)]
    certificate_names: Vec<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    allow: Vec<Rpc>,
}

impl Policy {
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        Self::parse(&std::fs::read(path)?)
    }

    pub fn parse(json: &[u8]) -> Result<Self, PolicyError> {
        let file: File = serde_json::from_slice(json)?;
        let mut names = HashSet::new();
        let mut entries = Vec::with_capacity(file.callers.len());
        for caller in file.callers {
            let invalid = |problem| PolicyError::Invalid {
                name: caller.name.clone(),
                problem,
            };
            if caller.name.is_empty() || !caller.name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid("the name must be visible ASCII, without spaces"));
            }
            if !names.insert(caller.name.clone()) {
                return Err(invalid("the name is used twice"));
            }
            if caller.certificate_names.is_empty() && caller.token_sha256.is_none() {
                return Err(invalid("give certificate_names, token_sha256 or both"));
            }
            let token_sha256 = caller
                .token_sha256
                .as_deref()
                .map(|hex_digest| {
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(hex_digest, &mut hash)
                        .map(|()| hash)
                        .map_err(|_| invalid("token_sha256 must be 64 hex digits"))
                })
                .transpose()?;
            entries.push(Entry {
                name: caller.name.into(),
                certificate_names: caller.certificate_names,
                token_sha256,
                allow: caller.allow,
            });
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_would_silently_grant_or_deny() {
        let bad = [
            (
                r#"{"callers":[{"name":"a","allow":["Get"]}]}"#,
                "no identity",
            ),
            (
                r#"{"callers":[{"name":"a","token_sha256":"abc","allow":["Get"]}]}"#,
                "short hash",
            ),
            (
                r#"{"callers":[{"name":"a","certificate_names":["x"],"allow":["Delete"]}]}"#,
                "unknown RPC",
            ),
            (
                r#"{"callers":[{"name":"a","certificate_names":["x"],"alow":["Get"]}]}"#,
                "misspelt field",
            ),
            (
                r#"{"callers":[{"name":"a","certificate_names":["x"],"allow":[]},{"name":"a","certificate_names":["y"],"allow":[]}]}"#,
                "duplicate name",
            ),
        ];
        for (json, why) in bad {
            assert!(Policy::parse(json.as_bytes()).is_err(), "accepted: {why}");
        }
        let good = r#"{"callers":[{"name":"a","certificate_names":["x"],"allow":["Link","Get"]}]}"#;
        let policy = Policy::parse(good.as_bytes()).expect("valid policy");
        assert_eq!(policy.entries[0].allow, vec![Rpc::Link, Rpc::Get]);
    }
}

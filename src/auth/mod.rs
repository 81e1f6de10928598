//! Who is calling, and whether they may call this RPC. Knows nothing of
//! gRPC: the gRPC layer hands in what the connection and metadata proved.
//!
//! A caller proves who it is with a bearer token or, under mutual TLS, with
//! the DNS or URI names (SANs) of its client certificate, which rustls has
//! already verified against the client CA. A token, when sent, decides;
//! otherwise the certificate does.

mod policy;

use std::{fmt, path::Path, sync::Arc};

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use policy::PolicyError;
use policy::{Entry, Policy};

/// The RPCs a policy can allow: the methods of `customermapping.v1.CustomerMapping`,
/// each by its own name (allowing `Get` does not allow the bulk reads, which
/// expose far more at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Rpc {
    Link,
    PrepareLink,
    Get,
    Unlink,
    BatchGet,
    List,
    ListEvents,
    Watch,
}

impl Rpc {
    /// Every RPC, in the proto's order: the one list that authorization,
    /// decoding, the fuzz target and the tests iterate (a unit test checks it
    /// against the compiled proto, so a new RPC can't be left out).
    pub const ALL: [Rpc; 8] = [
        Rpc::Link,
        Rpc::PrepareLink,
        Rpc::Get,
        Rpc::Unlink,
        Rpc::BatchGet,
        Rpc::List,
        Rpc::ListEvents,
        Rpc::Watch,
    ];

    /// The method name, as in the proto and the policy file.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Link => "Link",
            Rpc::PrepareLink => "PrepareLink",
            Rpc::Get => "Get",
            Rpc::Unlink => "Unlink",
            Rpc::BatchGet => "BatchGet",
            Rpc::List => "List",
            Rpc::ListEvents => "ListEvents",
            Rpc::Watch => "Watch",
        }
    }
}

/// What a call presented.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The client's verified leaf certificate (mutual TLS only).
    pub certificate: Option<&'a CertificateDer<'a>>,
    /// The `authorization` metadata, as sent.
    pub authorization: Option<&'a [u8]>,
}

/// Who is calling, as named in the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No policy is configured and nothing identified the caller.
    Anonymous,
    /// A policy entry's name, or (without a policy) a certificate name.
    Named(Arc<str>),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("anonymous"),
            Caller::Named(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Nothing the caller presented names an identity we know.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The caller is known, or at least has a verified certificate, but the
    /// policy does not let it call `method`.
    #[error("{caller} may not call {method}")]
    PermissionDenied {
        caller: Caller,
        method: &'static str,
    },
}

/// Why a call's credentials match no policy entry.
enum NoEntry {
    Unauthenticated(&'static str),
    /// A certificate the client CA vouches for, whose names no entry lists.
    UnlistedCertificate(String),
}

impl NoEntry {
    fn denying(self, method: &'static str) -> AuthError {
        match self {
            NoEntry::Unauthenticated(why) => AuthError::Unauthenticated(why),
            NoEntry::UnlistedCertificate(name) => AuthError::PermissionDenied {
                caller: Caller::Named(name.into()),
                method,
            },
        }
    }
}

/// Decides who a call comes from and whether it may proceed.
#[derive(Debug, Clone)]
pub struct Authorizer {
    policy: Option<Arc<Policy>>,
}

impl Authorizer {
    /// Everyone may call everything (no policy file configured).
    pub fn open() -> Self {
        Self { policy: None }
    }

    /// Enforces the policy in `path`.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        Ok(Self {
            policy: Some(Arc::new(Policy::from_file(path)?)),
        })
    }

    pub fn enforcing(&self) -> bool {
        self.policy.is_some()
    }

    /// Who the caller is, if it may use `method` at all (server reflection:
    /// any caller the policy knows).
    pub fn authenticate(
        &self,
        credentials: Credentials<'_>,
        method: &'static str,
    ) -> Result<Caller, AuthError> {
        match &self.policy {
            None => Ok(unchecked_caller(credentials)),
            Some(policy) => find_entry(policy, credentials)
                .map(|entry| Caller::Named(entry.name.clone()))
                .map_err(|no| no.denying(method)),
        }
    }

    /// Who the caller is, if it may call `rpc`.
    pub fn authorize(&self, credentials: Credentials<'_>, rpc: Rpc) -> Result<Caller, AuthError> {
        let Some(policy) = &self.policy else {
            return Ok(unchecked_caller(credentials));
        };
        let entry = find_entry(policy, credentials).map_err(|no| no.denying(rpc.name()))?;
        let caller = Caller::Named(entry.name.clone());
        if entry.allow.contains(&rpc) {
            Ok(caller)
        } else {
            Err(AuthError::PermissionDenied {
                caller,
                method: rpc.name(),
            })
        }
    }
}

/// Without a policy: the certificate's first name if there is one, so the
/// logs still say who called.
fn unchecked_caller(credentials: Credentials<'_>) -> Caller {
    certificate_names(credentials.certificate)
        .into_iter()
        .next()
        .map_or(Caller::Anonymous, |name| Caller::Named(name.into()))
}

fn find_entry<'p>(policy: &'p Policy, credentials: Credentials<'_>) -> Result<&'p Entry, NoEntry> {
    if let Some(header) = credentials.authorization {
        let token = bearer_token(header).ok_or(NoEntry::Unauthenticated(
            "the authorization metadata must be `Bearer <token>`",
        ))?;
        return find_by_token(policy, token)
            .ok_or(NoEntry::Unauthenticated("unknown bearer token"));
    }
    let names = certificate_names(credentials.certificate);
    let Some(first) = names.first() else {
        return Err(NoEntry::Unauthenticated(
            "send a bearer token or a client certificate",
        ));
    };
    policy
        .entries
        .iter()
        .find(|entry| entry.certificate_names.iter().any(|n| names.contains(n)))
        .ok_or_else(|| NoEntry::UnlistedCertificate(first.clone()))
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// Only hashes are stored, so a leaked policy file leaks no token. Every
/// entry is compared, in constant time, so timing tells an attacker nothing
/// about how close a guess came or which entry it hit.
fn find_by_token<'p>(policy: &'p Policy, token: &[u8]) -> Option<&'p Entry> {
    let presented: [u8; 32] = Sha256::digest(token).into();
    let mut found = None;
    for entry in &policy.entries {
        if let Some(hash) = &entry.token_sha256
            && bool::from(hash.ct_eq(&presented))
        {
            found = Some(entry);
        }
    }
    found
}

/// The DNS and URI subject alternative names of a certificate (CN is not
/// used: it is deprecated for identity and not constrained by most CAs).
fn certificate_names(certificate: Option<&CertificateDer<'_>>) -> Vec<String> {
    let Some(certificate) = certificate else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(certificate) {
        Ok(cert) => cert
            .valid_dns_names()
            .chain(cert.valid_uri_names())
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

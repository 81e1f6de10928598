//! TLS from PEM files that Kubernetes may rotate under us.
//!
//! The files are read again for every new connection (a few kilobytes from
//! the page cache) and the rustls configuration is rebuilt only when their
//! bytes changed. So a rotated certificate is served from the first
//! connection after the write, with no watcher and no restart; existing
//! connections keep the certificate they were set up with. Files that don't
//! parse (a rotation caught half-written) leave the last good configuration
//! in place.

use std::{
    io,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, anyhow};
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::config::TlsSettings;

/// Where the certificate, its key and (for mutual TLS) the client CAs live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files named in the settings; `None` when TLS is off.
    pub fn from_settings(settings: &TlsSettings) -> Option<Self> {
        Some(Self {
            cert: settings.tls_cert_file.clone()?,
            key: settings.tls_key_file.clone()?,
            client_ca: settings.tls_client_ca_file.clone(),
        })
    }
}

/// The TLS configuration for the next connection.
#[derive(Clone)]
pub struct ReloadingTls {
    files: TlsFiles,
    loaded: Arc<Mutex<Loaded>>,
}

struct Loaded {
    contents: Contents,
    config: Arc<ServerConfig>,
}

#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ReloadingTls {
    /// Loads the files; at start a bad file is an error, not a warning.
    pub fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let contents = read(&files)?;
        let config = build(&contents)?;
        Ok(Self {
            files,
            loaded: Arc::new(Mutex::new(Loaded { contents, config })),
        })
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration as the files say now, or the last good one.
    pub fn current(&self) -> Arc<ServerConfig> {
        let fresh = read(&self.files);
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match fresh {
            Ok(contents) if contents != loaded.contents => match build(&contents) {
                Ok(config) => {
                    tracing::info!("TLS files changed; new connections use the new certificate");
                    *loaded = Loaded { contents, config };
                }
                Err(err) => tracing::warn!(
                    error = format!("{err:#}"),
                    "TLS files changed but do not load; keeping the previous certificate"
                ),
            },
            Ok(_) => {}
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "cannot read the TLS files; keeping the previous certificate"
            ),
        }
        loaded.config.clone()
    }

    /// Runs the server side of the handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        TlsAcceptor::from(self.current()).accept(tcp).await
    }
}

fn read(files: &TlsFiles) -> anyhow::Result<Contents> {
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    Ok(Contents {
        cert: read(&files.cert)?,
        key: read(&files.key)?,
        client_ca: files.client_ca.as_ref().map(read).transpose()?,
    })
}

fn build(contents: &Contents) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the TLS certificate file")?;
    anyhow::ensure!(
        !chain.is_empty(),
        "the TLS certificate file holds no certificate"
    );
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|err| anyhow!("parsing the TLS key file: {err}"))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let builder = match &contents.client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(ca.context("parsing the client CA file")?)
                    .context("adding a client CA")?;
            }
            anyhow::ensure!(!roots.is_empty(), "the client CA file holds no certificate");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("loading the TLS certificate and key")?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

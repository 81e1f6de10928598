//! Certificates made in the test (rcgen), a server with TLS (and optionally
//! mutual TLS and a policy) on port 0, and TLS clients.

use std::{net::SocketAddr, path::PathBuf};

use customer_mapping::{config::Settings, startup::Application};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;

use super::{Backend, Client, RunningServer, TestDatabase, test_settings, wait_for_health};

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Pem {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate naming `name` as a DNS name, or as a URI when it
    /// has a scheme (`spiffe://...`).
    pub fn client(&self, name: &str) -> Pem {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![if name.contains("://") {
            SanType::URI(name.try_into().expect("an IA5 URI"))
        } else {
            SanType::DnsName(name.try_into().expect("an IA5 DNS name"))
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// What to turn on for a [`SecureApp`].
pub struct Security<'a> {
    pub mutual: bool,
    /// The policy file's JSON, if any.
    pub policy: Option<&'a str>,
    pub adjust: &'a dyn Fn(&mut Settings),
}

impl Default for Security<'_> {
    fn default() -> Self {
        Self {
            mutual: false,
            policy: None,
            adjust: &|_| {},
        }
    }
}

/// A server with TLS on its main port and plaintext health on another.
pub struct SecureApp {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    /// The CA that signed the server certificate (and the client ones).
    pub ca: Ca,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    _files: tempfile::TempDir,
    _database: TestDatabase,
    server: RunningServer,
}

impl Drop for SecureApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn spawn_secure(security: Security<'_>) -> SecureApp {
    let ca = Ca::new("test CA");
    let files = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, contents: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, contents).expect("write a test file");
        path
    };
    let server_pem = ca.server();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let mut settings = test_settings(database.url.clone());
    settings.tls.tls_cert_file = Some(write("server.pem", &server_pem.cert));
    settings.tls.tls_key_file = Some(write("server.key", &server_pem.key));
    if security.mutual {
        settings.tls.tls_client_ca_file = Some(write("client-ca.pem", &ca.pem()));
    }
    if let Some(policy) = security.policy {
        settings.access.policy_file = Some(write("policy.json", policy));
    }
    settings.access.health_listen_addr = Some("127.0.0.1:0".parse().expect("an address"));
    (security.adjust)(&mut settings);

    let app = Application::build(&settings)
        .await
        .expect("the application builds");
    let addr = app.local_addr();
    let health_addr = app.health_addr().expect("a health address");
    let server = RunningServer::spawn(app);
    wait_for_health(health_addr, "", ServingStatus::Serving).await;
    SecureApp {
        addr,
        health_addr,
        ca,
        cert_file: settings.tls.tls_cert_file.clone().expect("set above"),
        key_file: settings.tls.tls_key_file.clone().expect("set above"),
        _files: files,
        _database: database,
        server,
    }
}

impl SecureApp {
    /// A TLS client trusting the test CA, presenting `identity` if given.
    pub async fn client(&self, identity: Option<&Pem>) -> Result<Client, tonic::transport::Error> {
        connect_tls(self.addr, &self.ca.pem(), identity).await
    }

    /// A TLS channel (for other services' clients).
    pub async fn channel(
        &self,
        identity: Option<&Pem>,
    ) -> Result<Channel, tonic::transport::Error> {
        tls_channel(self.addr, &self.ca.pem(), identity).await
    }

    pub async fn stop(mut self) {
        self.server.stop().await;
    }
}

/// Connects over TLS, trusting `ca_pem` for the server's certificate.
pub async fn connect_tls(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Pem>,
) -> Result<Client, tonic::transport::Error> {
    Ok(Client::new(tls_channel(addr, ca_pem, identity).await?))
}

pub async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<&Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(pem) = identity {
        tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("a valid URI")
        .tls_config(tls)?
        .connect()
        .await
}

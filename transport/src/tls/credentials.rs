//! Loading credentials and turning them into rustls configurations: TLS 1.3 only, mutual
//! authentication always.

use super::psk;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::ring::default_provider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// How the two ends prove who they are.
#[derive(Debug, Clone)]
pub enum TlsAuth {
    /// PEM files: this side's certificate chain and private key, and the CA certificate(s)
    /// the peer's chain must lead to.
    Certificates { cert: PathBuf, key: PathBuf, ca: PathBuf },
    /// A secret both ends share, at least [`psk::MIN_SECRET_BYTES`] bytes
    /// ([`TlsAuth::psk_file`] reads one from a file).
    PreSharedKey { secret: Vec<u8> },
}

impl TlsAuth {
    /// A pre-shared key from a file (`openssl rand -hex 32 > FILE`), readable by its owner
    /// only; surrounding whitespace is not part of the key.
    pub fn psk_file(path: &Path) -> Result<TlsAuth, TlsError> {
        refuse_exposed(path)?;
        let secret = read(path)?.trim_ascii().to_vec();
        if secret.len() < psk::MIN_SECRET_BYTES {
            return Err(TlsError::ShortSecret {
                origin: path.display().to_string(),
                len: secret.len(),
                min: psk::MIN_SECRET_BYTES,
            });
        }
        Ok(TlsAuth::PreSharedKey { secret })
    }

    /// A fresh random pre-shared key, for two ends in one process (`demo --tls`).
    pub fn random_psk() -> TlsAuth {
        use ring::rand::SecureRandom;
        let mut secret = vec![0u8; psk::MIN_SECRET_BYTES];
        // The system's random source failing is a broken machine, not bad input.
        ring::rand::SystemRandom::new().fill(&mut secret).expect("the system random source works");
        TlsAuth::PreSharedKey { secret }
    }
}

/// TLS as the command line chose it.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub auth: TlsAuth,
    /// The name the destination's certificate must carry; by default the host the source
    /// connects to (an IP address is checked against the certificate's IP SANs).
    pub server_name: Option<String>,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path} is readable by other users (mode {mode:o}): chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the pre-shared key in {origin} is {len} bytes; at least {min} are needed (`openssl rand -hex 32 > FILE`)"
    )]
    ShortSecret { origin: String, len: usize, min: usize },
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("making the pre-shared key's certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(String),
}

/// rustls's ring provider with AES-128-GCM first: as strong as a migration needs, and its
/// 10 rounds against AES-256's 14 make it the cheapest suite per byte where the CPU has
/// AES instructions (a link's worth of guest memory passes through it).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256],
        ..default_provider()
    })
}

/// What a source needs to open secured connections.
#[derive(Clone)]
pub struct TlsClient {
    pub(super) config: Arc<ClientConfig>,
    pub(super) server_name: ServerName<'static>,
}

/// This side's certificate chain and key, and the roots it checks the peer against.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
}

impl TlsSettings {
    /// The source's configuration; `destination_host` is the host part of `--to`.
    pub fn client(&self, destination_host: &str) -> Result<TlsClient, TlsError> {
        let identity = self.identity()?;
        let name = match (&self.auth, &self.server_name) {
            (_, Some(name)) => name.clone(),
            (TlsAuth::PreSharedKey { .. }, None) => psk::SERVER_NAME.to_string(),
            (TlsAuth::Certificates { .. }, None) => destination_host.to_string(),
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(identity.roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(identity.chain, identity.key)?;
        Ok(TlsClient { config: Arc::new(config), server_name })
    }

    /// The destination's configuration: a client certificate is required.
    pub fn server(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let identity = self.identity()?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(identity.roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain, identity.key)?;
        // No resumption: every connection authenticates in full, and no ticket is sent
        // that the source would have to read before the go-ahead.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        match &self.auth {
            TlsAuth::Certificates { cert, key, ca } => {
                let chain = read_certificates(cert)?;
                refuse_exposed(key)?;
                let key_pem = read(key)?;
                let key_der =
                    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey { path: key.clone() })?;
                let mut roots = RootCertStore::empty();
                for root in read_certificates(ca)? {
                    roots.add(root)?;
                }
                Ok(Identity { chain, key: key_der, roots })
            }
            TlsAuth::PreSharedKey { secret } => {
                if secret.len() < psk::MIN_SECRET_BYTES {
                    return Err(TlsError::ShortSecret {
                        origin: "the configuration".into(),
                        len: secret.len(),
                        min: psk::MIN_SECRET_BYTES,
                    });
                }
                let derived = psk::identity(secret)?;
                let mut roots = RootCertStore::empty();
                roots.add(derived.ca)?;
                Ok(Identity { chain: derived.chain, key: derived.key, roots })
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certificates)
}

/// A secret other users can read is no longer a secret (ssh refuses such keys too).
fn refuse_exposed(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::Exposed { path: path.to_path_buf(), mode: mode & 0o777 });
    }
    Ok(())
}

//! Credentials for the TLS tests: a certificate authority, a destination and a source
//! certificate it signs, and pre-shared keys, written as files the CLI reads.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Files of one certificate authority and the two certificates it signed.
pub struct Pki {
    pub ca: PathBuf,
    pub destination_cert: PathBuf,
    pub destination_key: PathBuf,
    pub source_cert: PathBuf,
    pub source_key: PathBuf,
}

impl Pki {
    /// `--tls-cert/--tls-key/--tls-ca` for the destination.
    pub fn destination_args(&self) -> Vec<String> {
        args(&self.destination_cert, &self.destination_key, &self.ca)
    }

    /// `--tls-cert/--tls-key/--tls-ca` for the source.
    pub fn source_args(&self) -> Vec<String> {
        args(&self.source_cert, &self.source_key, &self.ca)
    }
}

fn args(cert: &Path, key: &Path, ca: &Path) -> Vec<String> {
    [
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
        "--tls-ca",
        &ca.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Writes a private file (mode 600), as an operator keeps keys.
pub fn write_secret(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// A fresh directory under the temp dir for one test's credentials.
pub fn credentials_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmigrate-tls-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create credentials dir");
    dir
}

/// A CA named `name` in `dir`, a destination certificate for `destination_names` (DNS
/// names or IP addresses) and a source certificate, all signed by it.
pub fn make_pki(dir: &Path, name: &str, destination_names: &[&str]) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} test CA"));
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = dir.join(format!("{name}-{file}.pem"));
        let key_path = dir.join(format!("{name}-{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        write_secret(&key_path, key.serialize_pem().as_bytes());
        (cert_path, key_path)
    };
    let (destination_cert, destination_key) = leaf(
        destination_names.iter().map(|n| n.to_string()).collect(),
        ExtendedKeyUsagePurpose::ServerAuth,
        "destination",
    );
    let (source_cert, source_key) = leaf(vec!["source".into()], ExtendedKeyUsagePurpose::ClientAuth, "source");
    let ca = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    Pki { ca, destination_cert, destination_key, source_cert, source_key }
}

/// A pre-shared key file in `dir` holding `secret`.
pub fn psk_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(format!("{name}.psk"));
    write_secret(&path, secret.as_bytes());
    path
}

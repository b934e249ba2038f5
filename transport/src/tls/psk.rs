//! The pre-shared-key mode. rustls has no external PSKs, so the key is turned into what it
//! does have: a certificate authority. Both ends derive the same Ed25519 CA key from the
//! secret (HKDF-SHA256), trust only that CA, and present a fresh leaf certificate it
//! signs. A peer without the secret cannot sign a leaf the other end accepts, so the
//! handshake itself refuses it, exactly as with real certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::hkdf;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name both ends use for the destination in this mode (it is in every leaf).
pub(super) const SERVER_NAME: &str = "vmigrate-psk";
/// A shorter secret is too easy to guess offline from a recorded handshake.
pub const MIN_SECRET_BYTES: usize = 32;

/// Salt and label of the derivation; changing them changes every derived CA.
const SALT: &[u8] = b"vmigrate pre-shared key v1";
const CA_LABEL: &[u8] = b"certificate authority";

/// PKCS#8 v1 wrapping of an Ed25519 private key (RFC 8410): this prefix, then the 32-byte
/// seed.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

pub(super) struct DerivedIdentity {
    /// The CA both ends derive: the only root either trusts.
    pub ca: CertificateDer<'static>,
    /// A fresh leaf signed by it.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

struct SeedLength;

impl hkdf::KeyType for SeedLength {
    fn len(&self) -> usize {
        32
    }
}

/// The CA key both holders of `secret` derive.
fn ca_key(secret: &[u8]) -> Result<KeyPair, rcgen::Error> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
    let mut seed = [0u8; 32];
    prk.expand(&[CA_LABEL], SeedLength)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
}

pub(super) fn identity(secret: &[u8]) -> Result<DerivedIdentity, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "vmigrate pre-shared key");
    ca_params.distinguished_name = name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = ca_key(secret)?;
    let ca = ca_params.self_signed(&ca_key)?.der().clone();

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &Issuer::new(ca_params, ca_key))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok(DerivedIdentity { ca, chain: vec![leaf.der().clone()], key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn the_same_secret_derives_the_same_ca_key_and_another_secret_does_not() {
        let a = ca_key(b"0123456789abcdef0123456789abcdef").unwrap();
        let b = ca_key(b"0123456789abcdef0123456789abcdef").unwrap();
        let c = ca_key(b"0123456789abcdef0123456789abcdeX").unwrap();
        assert_eq!(a.subject_public_key_info(), b.subject_public_key_info());
        assert_ne!(a.subject_public_key_info(), c.subject_public_key_info());
    }
}

//! One secured connection's record layer shared by its halves: the threaded reader and
//! writer (`stream.rs`) and the polling core's sealing and opening (`direct.rs`).

use super::record::{Opener, Sealer};
use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};

pub(super) struct Session {
    /// The connection's writer and the sealing keys; whoever holds them seals and sends
    /// records. `None` once the stack pulls the write side itself (`direct.rs`).
    pub(super) wire_out: Mutex<Option<(Box<dyn Write + Send>, Sealer)>>,
    /// What the threaded reader left when the stack took the read side over.
    pub(super) handed_over: Mutex<Option<HandedOver>>,
}

/// The read side as the threaded reader leaves it: the plain connection's reader, the
/// opening keys, ciphertext read and not yet opened, plaintext opened and not yet read.
pub(super) struct HandedOver {
    pub(super) wire_in: Box<dyn Read + Send>,
    pub(super) opener: Opener,
    pub(super) ciphertext: Vec<u8>,
    pub(super) plaintext: Vec<u8>,
}

pub(super) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves the session unusable anyway; the next TLS call says so.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Turns a rustls error into an operator's sentence.
pub(super) fn describe(err: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError, Error};
    match err {
        Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            "the peer's certificate is not signed by our CA (or it does not hold the same pre-shared key)".into()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the destination's certificate is not valid for the name we connect to (see --tls-server-name)".into(),
        Error::InvalidCertificate(other) => format!("the peer's certificate is not acceptable: {other:?}"),
        Error::NoCertificatesPresented => "the source presented no certificate".into(),
        Error::AlertReceived(Alert::CertificateRequired) => "the destination requires a certificate".into(),
        Error::AlertReceived(
            Alert::UnknownCA | Alert::BadCertificate | Alert::DecryptError | Alert::CertificateUnknown,
        ) => "the peer refused our certificate: it does not trust our CA or pre-shared key".into(),
        Error::InvalidMessage(_) => "the peer does not speak TLS (is TLS on at both ends?)".into(),
        other => format!("TLS: {other}"),
    }
}

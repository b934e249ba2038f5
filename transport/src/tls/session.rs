//! One rustls session shared by the halves of a connection: the threaded reader and
//! writer (`stream.rs`) and the polling core's sealing and opening (`direct.rs`).

use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};

pub(super) struct Session {
    pub(super) tls: Mutex<rustls::Connection>,
    /// The connection's writer; whoever holds it may seal and send records. `None` once
    /// the stack pulls the write side itself (`direct.rs`): records go out through it then.
    pub(super) wire_out: Mutex<Option<Box<dyn Write + Send>>>,
    /// What the threaded reader left when the stack took the read side over: the plain
    /// connection's reader, and the ciphertext read from it and not yet given to rustls.
    pub(super) handed_over: Mutex<Option<HandedOver>>,
}

/// The plain connection's reader and the ciphertext read from it, not yet opened.
pub(super) type HandedOver = (Box<dyn Read + Send>, Vec<u8>);

impl Session {
    /// Sends what decrypting made rustls want to say (a key update, an alert), if no
    /// writer is sending right now; a writer that is sends it with its own records, and
    /// once the stack pulls the write side, its next pull does.
    pub(super) fn answer(&self) -> io::Result<()> {
        let Ok(mut wire) = self.wire_out.try_lock() else { return Ok(()) };
        let Some(wire) = wire.as_mut() else { return Ok(()) };
        let mut sealed = Vec::new();
        {
            let mut tls = lock(&self.tls);
            while tls.wants_write() {
                tls.write_tls(&mut sealed)?;
            }
        }
        wire.write_all(&sealed)
    }

    /// The write side handed to the stack: the threaded writer no longer sends (its
    /// records would race the core's), and what rustls wants to send goes out through the
    /// stack's pull.
    pub(super) fn hand_over_writes(&self) -> Option<Box<dyn Write + Send>> {
        lock(&self.wire_out).take()
    }
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

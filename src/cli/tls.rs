//! `--tls*`: wraps the chosen stack's connector or acceptor in TLS.

use super::args::TlsOptions;
use super::exit::Failure;
use anyhow::{Context, Result};
use transport::pipe::{Acceptor, Connector};
use transport::tls::{TlsAcceptor, TlsAuth, TlsConnector, TlsSettings};

/// The settings the options ask for, or none when TLS is off.
fn settings(options: &TlsOptions) -> Result<Option<TlsSettings>> {
    let auth = match (&options.tls_cert, &options.tls_key, &options.tls_ca, &options.tls_psk) {
        (Some(cert), Some(key), Some(ca), None) => {
            TlsAuth::Certificates { cert: cert.clone(), key: key.clone(), ca: ca.clone() }
        }
        (None, None, None, Some(path)) => TlsAuth::psk_file(path)?,
        (None, None, None, None) if options.tls => {
            return Err(Failure::usage("--tls needs credentials: --tls-cert, --tls-key and --tls-ca, or --tls-psk"))
        }
        (None, None, None, None) => return Ok(None),
        _ => return Err(Failure::usage("give either --tls-cert, --tls-key and --tls-ca, or --tls-psk")),
    };
    Ok(Some(TlsSettings { auth, server_name: options.tls_server_name.clone() }))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The source's connector, secured when the options ask for TLS.
pub(super) fn secure_connector(
    options: &TlsOptions,
    connector: Box<dyn Connector>,
    to: &str,
) -> Result<Box<dyn Connector>> {
    Ok(match settings(options)? {
        Some(settings) => {
            let client = settings.client(host_of(to)).context("TLS")?;
            Box::new(TlsConnector::new(connector, client))
        }
        None => connector,
    })
}

/// The destination's acceptor, secured when the options ask for TLS.
pub(super) fn secure_acceptor(options: &TlsOptions, acceptor: Box<dyn Acceptor>) -> Result<Box<dyn Acceptor>> {
    Ok(match settings(options)? {
        Some(settings) => Box::new(TlsAcceptor::new(acceptor, settings.server().context("TLS")?)),
        None => acceptor,
    })
}

/// Both ends of the demo's link, secured when asked; `--tls` alone takes a fresh key.
pub(super) fn secure_demo_link(
    options: &TlsOptions,
    connector: Box<dyn Connector>,
    acceptor: Box<dyn Acceptor + Send>,
) -> Result<(Box<dyn Connector>, Box<dyn Acceptor + Send>)> {
    let settings = match settings(options) {
        Ok(settings) => settings,
        Err(_) if options.tls && options.tls_cert.is_none() && options.tls_psk.is_none() => {
            Some(TlsSettings { auth: TlsAuth::random_psk(), server_name: None })
        }
        Err(err) => return Err(err),
    };
    Ok(match settings {
        Some(settings) => (
            Box::new(TlsConnector::new(connector, settings.client("localhost").context("TLS")?)),
            Box::new(TlsAcceptor::new(acceptor, settings.server().context("TLS")?)),
        ),
        None => (connector, acceptor),
    })
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_of_an_address_drops_the_port_and_brackets() {
        assert_eq!(host_of("10.0.0.2:4444"), "10.0.0.2");
        assert_eq!(host_of("dest.example:4444"), "dest.example");
        assert_eq!(host_of("[fd00::2]:4444"), "fd00::2");
    }
}

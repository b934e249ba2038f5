//! The values the command line's options take: sizes, rates, addresses as QEMU writes
//! them, percentages, fault windows, and the XBZRLE cache the flags ask for.

use std::net::SocketAddr;

pub fn parse_percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(pct) if (0.0..=100.0).contains(&pct) => Ok(pct),
        _ => Err(format!("expected a percentage from 0 to 100, got {text:?}")),
    }
}

pub fn parse_blackout(text: &str) -> Result<dataplane::faults::Blackout, String> {
    let (after, length) = text.split_once(':').ok_or_else(|| format!("expected AFTER_MS:LENGTH_MS, got {text:?}"))?;
    let ms =
        |part: &str| part.parse::<u64>().map(std::time::Duration::from_millis).map_err(|e| format!("{part:?}: {e}"));
    Ok(dataplane::faults::Blackout { after: ms(after)?, length: ms(length)? })
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    guests::synthetic::parse_size(text)
}

/// XBZRLE's cache when `--xbzrle` alone turns it on: QEMU's default.
const DEFAULT_XBZRLE_CACHE: u64 = 64 << 20;

/// The XBZRLE cache `--xbzrle` and `--xbzrle-cache` ask for, the same on every command:
/// either turns it on, the size (if given) sets the cache; `None` is off.
pub fn xbzrle_cache(xbzrle: bool, size: Option<u64>) -> Option<u64> {
    size.or(xbzrle.then_some(DEFAULT_XBZRLE_CACHE))
}

/// A TCP address as QEMU writes it or as a socket address: `tcp:HOST:PORT` or `HOST:PORT`.
pub fn parse_tcp(text: &str) -> Result<String, String> {
    let address = text.strip_prefix("tcp:").unwrap_or(text);
    if address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
        return Err(format!("{text:?}: not HOST:PORT (or tcp:HOST:PORT)"));
    }
    Ok(address.to_string())
}

/// A local address to listen on: `tcp:IP:PORT` or `IP:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let address = text.strip_prefix("tcp:").unwrap_or(text);
    address.parse().map_err(|err| format!("{text:?}: not IP:PORT (or tcp:IP:PORT): {err}"))
}

/// `1gbit`, `100mbit`, `10kbit` are bits per second; anything else is a size per second.
pub fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let lower = text.to_ascii_lowercase();
    for (suffix, scale) in [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)] {
        if let Some(number) = lower.strip_suffix(suffix) {
            let value: f64 = number.parse().map_err(|_| format!("bad bandwidth {text:?}"))?;
            return Ok((value * scale / 8.0) as u64);
        }
    }
    parse_size(lower.trim_end_matches("/s"))
}

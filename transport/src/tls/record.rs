//! The TLS 1.3 record layer after the handshake, ours rather than rustls's (RFC 8446, 5.2
//! and 7.2). rustls runs the handshake and hands over each direction's traffic keys
//! (`dangerous_extract_secrets`, as it does for kernel TLS); records are then sealed straight
//! into the buffer that goes out and opened in place in the buffer they arrived in. rustls's
//! own record layer copied each record's plaintext into an allocation of its own on both
//! sides and out again: two thirds of a receiving stream's CPU on kernel TCP.
//!
//! Key updates keep each key under AES-GCM's limit on records. rustls does not hand out
//! the traffic secrets a key update ratchets, so they come from its key log of this one
//! connection ([`TrafficSecrets`]), and every connection checks that the keys it derives from
//! them are the ones rustls extracted before a byte moves.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets, KeyLog, SupportedCipherSuite};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Most plaintext one record carries.
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
/// A record's header: content type, legacy version, length.
pub(super) const HEADER: usize = 5;
const TAG: usize = 16;
/// Most a record's encrypted part may hold: plaintext, content type, padding, tag.
const MAX_ENCRYPTED: usize = MAX_PLAINTEXT + 256;
/// The largest record on the wire.
pub(super) const MAX_RECORD: usize = HEADER + MAX_ENCRYPTED;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// KeyUpdate, update_not_requested.
const KEY_UPDATE_MESSAGE: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// The bytes a record of `plaintext` bytes takes on the wire.
const fn sealed_len(plaintext: usize) -> usize {
    HEADER + plaintext + 1 + TAG
}

/// Room enough to seal `plaintext` bytes whole: its records, and a key update's.
pub(super) const fn sealed_room(plaintext: usize) -> usize {
    plaintext + plaintext.div_ceil(MAX_PLAINTEXT) * sealed_len(0) + sealed_len(KEY_UPDATE_MESSAGE.len())
}

/// Records sealed under one key before the next key update: well under AES-GCM's
/// confidentiality limit (2^24 records; 128 GiB of 16 KiB records here).
const UPDATE_KEY_AFTER_RECORDS: u64 = 1 << 23;

/// The two traffic secrets rustls logs for one connection; see the module's note.
#[derive(Debug, Default)]
pub(super) struct TrafficSecrets {
    client: Mutex<Option<Vec<u8>>>,
    server: Mutex<Option<Vec<u8>>>,
}

impl KeyLog for TrafficSecrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            "CLIENT_TRAFFIC_SECRET_0" => &self.client,
            "SERVER_TRAFFIC_SECRET_0" => &self.server,
            _ => return,
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(secret.to_vec());
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }
}

impl TrafficSecrets {
    fn take(slot: &Mutex<Option<Vec<u8>>>) -> io::Result<Vec<u8>> {
        slot.lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| io::Error::other("TLS: the handshake logged no traffic secret"))
    }
}

/// A session configuration that can log one connection's traffic secrets and give its
/// keys up after the handshake.
pub(super) trait Keyable: Clone {
    fn log_into(&mut self, secrets: Arc<TrafficSecrets>);
}

impl Keyable for rustls::ClientConfig {
    fn log_into(&mut self, secrets: Arc<TrafficSecrets>) {
        self.key_log = secrets;
        self.enable_secret_extraction = true;
    }
}

impl Keyable for rustls::ServerConfig {
    fn log_into(&mut self, secrets: Arc<TrafficSecrets>) {
        self.key_log = secrets;
        self.enable_secret_extraction = true;
    }
}

/// `config` for one connection, and the log its traffic secrets will be in.
pub(super) fn keyed<C: Keyable>(config: &Arc<C>) -> (Arc<C>, Arc<TrafficSecrets>) {
    let secrets = Arc::new(TrafficSecrets::default());
    let mut config = C::clone(config);
    config.log_into(secrets.clone());
    (Arc::new(config), secrets)
}

/// The AEAD and hash of the negotiated suite.
#[derive(Clone, Copy)]
struct Suite {
    aead: &'static ring::aead::Algorithm,
    hkdf: hkdf::Algorithm,
}

impl Suite {
    fn of(suite: SupportedCipherSuite) -> io::Result<Suite> {
        let (aead, hkdf) = match suite.suite() {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => (&ring::aead::AES_128_GCM, hkdf::HKDF_SHA256),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => (&ring::aead::AES_256_GCM, hkdf::HKDF_SHA384),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => (&ring::aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256),
            other => return Err(io::Error::other(format!("TLS: no record layer for {other:?}"))),
        };
        Ok(Suite { aead, hkdf })
    }

    fn hash_len(self) -> usize {
        self.hkdf.hmac_algorithm().digest_algorithm().output_len()
    }
}

/// A length for ring's HKDF output.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label (RFC 8446, 7.1) with an empty context.
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let prk = hkdf::Prk::new_less_safe(suite.hkdf, secret);
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    // The lengths are the suite's own, far under HKDF's limit of 255 hashes.
    prk.expand(&info, Len(out.len())).and_then(|okm| okm.fill(out)).expect("HKDF-Expand-Label of a key's length");
}

/// A traffic secret's key and IV (RFC 8446, 7.3).
fn key_and_iv(suite: Suite, secret: &[u8]) -> (Vec<u8>, [u8; NONCE_LEN]) {
    let mut key = vec![0u8; suite.aead.key_len()];
    expand_label(suite, secret, b"key", &mut key);
    let mut iv = [0u8; NONCE_LEN];
    expand_label(suite, secret, b"iv", &mut iv);
    (key, iv)
}

/// One direction's key: the traffic secret it came from, the key, the IV, the next
/// record's sequence number.
struct Keys {
    suite: Suite,
    secret: Vec<u8>,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn derive(suite: Suite, secret: Vec<u8>, seq: u64) -> Keys {
        let (key, iv) = key_and_iv(suite, &secret);
        Keys::from_parts(suite, secret, &key, iv, seq)
    }

    fn from_parts(suite: Suite, secret: Vec<u8>, key: &[u8], iv: [u8; NONCE_LEN], seq: u64) -> Keys {
        let key = LessSafeKey::new(UnboundKey::new(suite.aead, key).expect("a key of the suite's length"));
        Keys { suite, secret, key, iv, seq }
    }

    /// The keys derived from the logged `secret`, checked against those rustls extracted.
    fn checked(suite: Suite, secret: Vec<u8>, extracted: (u64, ConnectionTrafficSecrets)) -> io::Result<Keys> {
        let (seq, traffic) = extracted;
        let (extracted_key, extracted_iv) = match &traffic {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return Err(io::Error::other("TLS: rustls extracted keys of an unknown kind")),
        };
        let (key, iv) = key_and_iv(suite, &secret);
        if key != extracted_key || iv[..] != *extracted_iv {
            return Err(io::Error::other("TLS: the keys derived from the logged secret are not rustls's"));
        }
        Ok(Keys::from_parts(suite, secret, &key, iv, seq))
    }

    /// The next key (a key update, RFC 8446 7.2): the secret ratchets, numbering restarts.
    fn update(&mut self) {
        let mut next = vec![0u8; self.suite.hash_len()];
        expand_label(self.suite, &self.secret, b"traffic upd", &mut next);
        *self = Keys::derive(self.suite, next, 0);
    }

    /// The nonce of the next record, which takes its sequence number.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq =
            self.seq.checked_add(1).ok_or_else(|| io::Error::other("TLS: the record sequence number ran out"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The sealing half of a session's record layer, and the opening half, made from a finished
/// handshake. `secrets` is the key log the connection's configuration carried.
pub(super) fn split_keys(tls: rustls::Connection, secrets: &TrafficSecrets) -> io::Result<(Sealer, Opener)> {
    let suite = tls.negotiated_cipher_suite().ok_or_else(|| io::Error::other("TLS: no suite negotiated"))?;
    let suite = Suite::of(suite)?;
    let is_client = matches!(tls, rustls::Connection::Client(_));
    let ExtractedSecrets { tx, rx } =
        tls.dangerous_extract_secrets().map_err(|e| io::Error::other(format!("TLS: extracting keys: {e}")))?;
    let client = TrafficSecrets::take(&secrets.client)?;
    let server = TrafficSecrets::take(&secrets.server)?;
    let (tx_secret, rx_secret) = if is_client { (client, server) } else { (server, client) };
    let peer_asked_update = Arc::new(AtomicBool::new(false));
    let sealer = Sealer {
        keys: Keys::checked(suite, tx_secret, tx)?,
        update_after: UPDATE_KEY_AFTER_RECORDS,
        peer_asked_update: peer_asked_update.clone(),
    };
    let opener = Opener { keys: Keys::checked(suite, rx_secret, rx)?, peer_asked_update };
    Ok((sealer, opener))
}

/// Seals plaintext into records.
pub(super) struct Sealer {
    keys: Keys,
    /// Records sealed under one key before it is updated.
    update_after: u64,
    /// The peer's key update asked for ours (set by the [`Opener`]).
    peer_asked_update: Arc<AtomicBool>,
}

impl Sealer {
    /// Seals records of `plaintext` straight into `out` for as long as whole ones fit there
    /// (with a key update's record before one, where an update is due): how many plaintext
    /// bytes were sealed, and how many bytes of `out` the records took.
    pub(super) fn seal_into(&mut self, plaintext: &[u8], out: &mut [u8]) -> io::Result<(usize, usize)> {
        let (mut taken, mut written) = (0, 0);
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            let update = self.keys.seq >= self.update_after || self.peer_asked_update.load(Ordering::Acquire);
            let room = sealed_len(chunk.len()) + if update { sealed_len(KEY_UPDATE_MESSAGE.len()) } else { 0 };
            if out.len() - written < room {
                break;
            }
            if update {
                // update_not_requested: the peer's key is its own business. An ask that
                // arrives meanwhile is answered by this update too.
                self.peer_asked_update.store(false, Ordering::Release);
                written += self.seal_record(HANDSHAKE, &KEY_UPDATE_MESSAGE, &mut out[written..])?;
                self.keys.update();
            }
            written += self.seal_record(APPLICATION_DATA, chunk, &mut out[written..])?;
            taken += chunk.len();
        }
        Ok((taken, written))
    }

    /// Appends `plaintext` to `out` as application data records.
    pub(super) fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            let start = out.len();
            out.resize(start + sealed_room(chunk.len()), 0);
            let (_, written) = self.seal_into(chunk, &mut out[start..])?;
            out.truncate(start + written);
        }
        Ok(())
    }

    /// Appends the alert that ends this direction cleanly.
    pub(super) fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        out.resize(start + sealed_len(CLOSE_NOTIFY.len()), 0);
        self.seal_record(ALERT, &CLOSE_NOTIFY, &mut out[start..])?;
        Ok(())
    }

    /// Seals one record at the front of `out`, which has room for it; its length.
    fn seal_record(&mut self, content_type: u8, payload: &[u8], out: &mut [u8]) -> io::Result<usize> {
        let encrypted = payload.len() + 1 + TAG;
        let mut header = [APPLICATION_DATA, 3, 3, 0, 0];
        header[3..].copy_from_slice(&(encrypted as u16).to_be_bytes());
        let (head, rest) = out[..HEADER + encrypted].split_at_mut(HEADER);
        let (body, tag_out) = rest.split_at_mut(payload.len() + 1);
        head.copy_from_slice(&header);
        body[..payload.len()].copy_from_slice(payload);
        body[payload.len()] = content_type;
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(HEADER + encrypted)
    }

    #[cfg(test)]
    pub(super) fn update_after(&mut self, records: u64) {
        self.update_after = records;
    }
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// Application data: this range of the record passed to [`Opener::open`].
    Data(std::ops::Range<usize>),
    /// The peer ended its direction cleanly (close_notify).
    Closed,
    /// Nothing for the application (a key update).
    Nothing,
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {why}"))
}

/// The length of the whole record at the front of `bytes`, once its header is there.
pub(super) fn record_len(bytes: &[u8]) -> io::Result<Option<usize>> {
    let Some(header) = bytes.get(..HEADER) else { return Ok(None) };
    if header[0] != APPLICATION_DATA || header[1] != 3 {
        return Err(invalid("the peer sent something that is not an encrypted TLS 1.3 record"));
    }
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if !(TAG + 1..=MAX_ENCRYPTED).contains(&length) {
        return Err(invalid("a record of an impossible length"));
    }
    Ok(Some(HEADER + length))
}

/// Opens records in place.
pub(super) struct Opener {
    keys: Keys,
    peer_asked_update: Arc<AtomicBool>,
}

impl Opener {
    /// Opens one whole record (as long as [`record_len`] says) in place.
    pub(super) fn open(&mut self, record: &mut [u8]) -> io::Result<Opened> {
        let (header, body) = record.split_at_mut(HEADER);
        let header: [u8; HEADER] = header.try_into().expect("a header's length");
        let nonce = self.keys.next_nonce()?;
        let plaintext = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| invalid("a record failed its authentication (corrupted, or not from our peer)"))?;
        // The inner content type is the last byte that is not padding.
        let Some(end) = plaintext.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a record without a content type"));
        };
        let payload = &plaintext[..end];
        match plaintext[end] {
            APPLICATION_DATA => Ok(Opened::Data(HEADER..HEADER + end)),
            ALERT if payload == CLOSE_NOTIFY => Ok(Opened::Closed),
            ALERT => {
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, format!("TLS: the peer sent alert {payload:?}")))
            }
            HANDSHAKE => {
                self.handshake_messages(payload)?;
                Ok(Opened::Nothing)
            }
            other => Err(invalid(&format!("a record of content type {other}"))),
        }
    }

    /// Post-handshake messages: only key updates come between two of our ends.
    fn handshake_messages(&mut self, mut messages: &[u8]) -> io::Result<()> {
        while !messages.is_empty() {
            let &[kind, a, b, c, ref rest @ ..] = messages else {
                return Err(invalid("a truncated handshake message"));
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if kind != KEY_UPDATE || len != 1 || rest.is_empty() {
                return Err(invalid(&format!("an unexpected handshake message (type {kind}) after the handshake")));
            }
            match rest[0] {
                0 => {}
                1 => self.peer_asked_update.store(true, Ordering::Release),
                _ => return Err(invalid("a malformed key update")),
            }
            // Records after this one are sealed under the peer's next key.
            self.keys.update();
            messages = &rest[1..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Sealer, Opener, Sealer, Opener) {
        let suite = Suite { aead: &ring::aead::AES_128_GCM, hkdf: hkdf::HKDF_SHA256 };
        let half = |secret: u8| {
            let asked = Arc::new(AtomicBool::new(false));
            let sealer = Sealer {
                keys: Keys::derive(suite, vec![secret; 32], 0),
                update_after: UPDATE_KEY_AFTER_RECORDS,
                peer_asked_update: asked.clone(),
            };
            (sealer, asked)
        };
        let (a_sealer, a_asked) = half(1);
        let (b_sealer, b_asked) = half(2);
        let a_opener = Opener { keys: Keys::derive(suite, vec![2; 32], 0), peer_asked_update: a_asked };
        let b_opener = Opener { keys: Keys::derive(suite, vec![1; 32], 0), peer_asked_update: b_asked };
        (a_sealer, a_opener, b_sealer, b_opener)
    }

    /// Opens every record of `wire`; returns the application's bytes and whether it closed.
    fn open_all(opener: &mut Opener, wire: &mut [u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut plaintext = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = record_len(&wire[at..])?.expect("a whole header");
            let record = &mut wire[at..at + len];
            match opener.open(record)? {
                Opened::Data(range) => plaintext.extend_from_slice(&record[range]),
                Opened::Closed => return Ok((plaintext, true)),
                Opened::Nothing => {}
            }
            at += len;
        }
        Ok((plaintext, false))
    }

    #[test]
    fn sealed_records_open_to_the_same_bytes_across_key_updates() {
        let (mut sealer, _, _, mut opener) = pair();
        sealer.update_after(3);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        sealer.seal(b"tail", &mut wire).unwrap();
        sealer.seal_close_notify(&mut wire).unwrap();
        let (opened, closed) = open_all(&mut opener, &mut wire).unwrap();
        assert!(closed);
        assert_eq!(opened.len(), data.len() + 4);
        assert!(opened[..data.len()] == data[..] && &opened[data.len()..] == b"tail");
    }

    #[test]
    fn records_sealed_into_a_buffer_stop_at_the_last_whole_one_that_fits() {
        let (mut sealer, _, _, mut opener) = pair();
        sealer.update_after(4);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        // Two records fit, a third does not; the fifth record's turn brings a key update.
        let mut out = vec![0u8; 2 * sealed_len(MAX_PLAINTEXT) + 100];
        let (taken, written) = sealer.seal_into(&data, &mut out).unwrap();
        assert_eq!((taken, written), (2 * MAX_PLAINTEXT, 2 * sealed_len(MAX_PLAINTEXT)));
        let mut wire = out[..written].to_vec();
        let mut rest = vec![0u8; sealed_room(data.len() - taken)];
        let (more, more_written) = sealer.seal_into(&data[taken..], &mut rest).unwrap();
        assert_eq!(more, data.len() - taken, "room enough for the rest and a key update");
        wire.extend_from_slice(&rest[..more_written]);
        let (opened, _) = open_all(&mut opener, &mut wire).unwrap();
        assert!(opened == data, "the bytes open as they were sealed");
        assert_eq!(opener.keys.seq, 3, "the last three of seven records came after the key update");
    }

    #[test]
    fn a_key_update_the_peer_asks_for_updates_ours() {
        let (mut a_sealer, mut a_opener, mut b_sealer, mut b_opener) = pair();
        let mut wire = vec![0; MAX_RECORD];
        // A peer asking for our update, as RFC 8446 allows.
        let asking = a_sealer.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1], &mut wire).unwrap();
        wire.truncate(asking);
        a_sealer.keys.update();
        a_sealer.seal(b"after", &mut wire).unwrap();
        assert_eq!(open_all(&mut b_opener, &mut wire).unwrap().0, b"after");
        let mut reply = Vec::new();
        b_sealer.seal(b"answer", &mut reply).unwrap();
        assert_eq!(open_all(&mut a_opener, &mut reply).unwrap().0, b"answer");
        assert_eq!(a_opener.keys.seq, 1, "the answer came under the updated key, after the update");
    }

    /// A finished in-memory handshake: our client end's keys, and rustls's server end.
    fn handshake_with_rustls() -> (Sealer, Opener, rustls::ServerConnection) {
        use crate::tls::{TlsAuth, TlsSettings};
        let settings = TlsSettings {
            auth: TlsAuth::PreSharedKey { secret: b"0123456789abcdef0123456789abcdef".to_vec() },
            server_name: None,
        };
        let (client_config, secrets) = keyed(&settings.client("127.0.0.1").unwrap().config);
        let name = settings.client("127.0.0.1").unwrap().server_name;
        let mut client = rustls::ClientConnection::new(client_config, name).unwrap();
        let mut server = rustls::ServerConnection::new(settings.server().unwrap()).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut flight = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut flight).unwrap();
            }
            server.read_tls(&mut &flight[..]).unwrap();
            server.process_new_packets().unwrap();
            flight.clear();
            while server.wants_write() {
                server.write_tls(&mut flight).unwrap();
            }
            client.read_tls(&mut &flight[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let (sealer, opener) = split_keys(client.into(), &secrets).unwrap();
        (sealer, opener, server)
    }

    /// Our records, key updates included, are ones rustls opens, and rustls's (its own key
    /// update too) are ones we open: the record format and the key schedule are TLS 1.3's.
    #[test]
    fn records_and_key_updates_interoperate_with_rustls() {
        use std::io::Read;
        let (mut sealer, mut opener, mut server) = handshake_with_rustls();
        sealer.update_after(2);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13) as u8).collect();
        let mut wire = Vec::new();
        sealer.seal(&data, &mut wire).unwrap();
        sealer.seal_close_notify(&mut wire).unwrap();
        let mut received = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            server.read_tls(&mut rest).unwrap();
            server.process_new_packets().unwrap();
            let mut chunk = Vec::new();
            match server.reader().read_to_end(&mut chunk) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
            received.extend_from_slice(&chunk);
        }
        assert!(received == data, "rustls opened {} bytes, not what was sealed", received.len());

        use std::io::Write;
        server.writer().write_all(b"before").unwrap();
        server.refresh_traffic_keys().unwrap();
        server.writer().write_all(b" and after a key update").unwrap();
        let mut flight = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut flight).unwrap();
        }
        let (opened, _) = open_all(&mut opener, &mut flight).unwrap();
        assert_eq!(opened, b"before and after a key update");
    }

    #[test]
    fn a_changed_byte_fails_authentication() {
        let (mut sealer, _, _, mut opener) = pair();
        let mut wire = Vec::new();
        sealer.seal(b"guest memory", &mut wire).unwrap();
        wire[HEADER + 3] ^= 1;
        let err = open_all(&mut opener, &mut wire).unwrap_err();
        assert!(err.to_string().contains("authentication"), "{err}");
    }

    #[test]
    fn headers_that_are_not_records_are_refused() {
        assert!(record_len(&[23, 3, 3, 0]).unwrap().is_none());
        assert!(record_len(b"GET / HTTP/1.1").is_err());
        assert!(record_len(&[23, 3, 3, 0xff, 0xff]).is_err());
        assert_eq!(record_len(&[23, 3, 3, 0, 17]).unwrap(), Some(22));
    }
}

//! Who is at the source relay's socket: QEMU's streams, told apart by their first bytes,
//! and anyone else, turned away without disturbing QEMU's.
//!
//! QEMU's main stream opens with `QEVM`, each multifd stream with the multifd magic. A
//! connection is looked at (its first bytes peeked, not read: the pump carries them) on a
//! thread of its own, so a silent one holds up nothing: it waits, unnumbered, until it
//! speaks or the session ends. One that says anything else is closed with a warning naming
//! what it sent. The main stream is numbered first whatever order the connections came
//! in, since the destination QEMU takes its first connection as the main channel.

use std::io;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

/// How long one peek waits before it looks whether the session is over.
const PEEK_WAIT: Duration = Duration::from_millis(100);
/// What tells QEMU's streams apart: a magic and a version, big-endian (QEMU's
/// `QEMU_VM_FILE_MAGIC` and `QEMU_VM_FILE_VERSION`; `MULTIFD_MAGIC` and `MULTIFD_VERSION`).
/// Waiting for the version too keeps a stranger that sent only "QEVM" from being taken
/// for QEMU's main stream.
const MAGIC_BYTES: usize = 8;
const MAIN_MAGIC: &[u8; MAGIC_BYTES] = b"QEVM\0\0\0\x03";
const MULTIFD_MAGIC: &[u8; MAGIC_BYTES] = &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];

/// What a connection turned out to be.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// QEMU's main stream.
    Main(UnixStream),
    /// One of QEMU's multifd streams.
    Multifd(UnixStream),
    /// Not QEMU's: who it was (see `peer_of`) and why it is not.
    Stranger { peer: String, why: String },
}

/// Looks at `local` on a thread of its own until it speaks (or closes, or `over` is set),
/// then tells `arrivals` what it is.
pub(crate) fn look_at(local: UnixStream, arrivals: Sender<Arrival>, over: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("relay-doorway".into()).spawn(move || {
        let peer = peer_of(&local);
        let arrival = match identify(local, &over) {
            Some(Ok(arrival)) => arrival,
            Some(Err(why)) => Arrival::Stranger { peer, why },
            None => return,
        };
        let _ = arrivals.send(arrival);
    });
    if let Err(err) = spawned {
        log::warn!("could not look at a connection on the relay's socket: {err}");
    }
}

/// What `local` is, once its first bytes are there (Err: why it is a stranger); None if
/// the session ended first.
fn identify(local: UnixStream, over: &AtomicBool) -> Option<Result<Arrival, String>> {
    if let Err(err) = local.set_read_timeout(Some(PEEK_WAIT)) {
        return Some(Err(format!("its socket failed: {err}")));
    }
    let mut first = [0u8; MAGIC_BYTES];
    let said = loop {
        if over.load(Ordering::Acquire) {
            return None;
        }
        match peek(&local, &mut first) {
            Ok(0) => return Some(Err("it closed without a word".into())),
            Ok(n) if n < MAGIC_BYTES && !starts_like_qemu(&first[..n]) => break n,
            // The rest of the magic may be on its way (or never come: a stranger).
            Ok(n) if n < MAGIC_BYTES => std::thread::sleep(Duration::from_millis(10)),
            Ok(n) => break n,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Some(Err(format!("its socket failed: {err}"))),
        }
    };
    let _ = local.set_read_timeout(None);
    Some(if &first == MAIN_MAGIC {
        Ok(Arrival::Main(local))
    } else if &first == MULTIFD_MAGIC {
        Ok(Arrival::Multifd(local))
    } else {
        Err(format!("not a QEMU migration stream (it began {})", printable(&first[..said])))
    })
}

/// The first bytes a stranger sent, as text where they are text (`"GET "`), else in hex.
fn printable(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        format!("{bytes:02x?}")
    }
}

/// Who is at the other end of `local`: its process and user, as the kernel vouches for
/// them (a unix socket's peer has no address to name).
pub(crate) fn peer_of(local: &UnixStream) -> String {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals the kernel writes at most `len` bytes into,
    // and the descriptor belongs to `local`, borrowed for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            local.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("pid {} (uid {})", cred.pid, cred.uid)
    } else {
        "an unknown peer".into()
    }
}

/// Whether `bytes` may still be the start of one of QEMU's magics.
fn starts_like_qemu(bytes: &[u8]) -> bool {
    MAIN_MAGIC.starts_with(bytes) || MULTIFD_MAGIC.starts_with(bytes)
}

/// The bytes waiting on `local`, up to `into`'s length, left there to be read.
fn peek(local: &UnixStream, into: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `into` is a live, writable buffer of `into.len()` bytes for the whole call,
    // and the descriptor belongs to `local`, which outlives it.
    let n = unsafe { libc::recv(local.as_raw_fd(), into.as_mut_ptr().cast(), into.len(), libc::MSG_PEEK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn arrival_of(bytes: &[u8]) -> Result<Arrival, String> {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(bytes).unwrap();
        identify(ours, &AtomicBool::new(false)).expect("an arrival")
    }

    #[test]
    fn qemus_streams_are_told_apart_and_keep_their_first_bytes() {
        let Ok(Arrival::Main(mut main)) = arrival_of(b"QEVM\0\0\0\x03") else { panic!("not main") };
        let mut first = [0u8; 8];
        main.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"QEVM\0\0\0\x03", "peeked, not read");
        assert!(matches!(arrival_of(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1, 9]), Ok(Arrival::Multifd(_))));
        assert!(arrival_of(b"QEVM\0\0\0\x07").is_err(), "a version QEMU does not write");
    }

    #[test]
    fn anything_else_is_a_stranger() {
        let Err(why) = arrival_of(&[0xde, 0xad, 0xbe, 0xef]) else { panic!("taken for QEMU") };
        assert!(why.contains("[de, ad, be, ef]"), "{why}");
        let Err(why) = arrival_of(b"GET / HTTP/1.1\r\n") else { panic!("taken for QEMU") };
        assert!(why.contains(r#"not a QEMU migration stream (it began "GET / HT")"#), "{why}");
        assert!(arrival_of(b"Q!").is_err(), "a short mismatch is enough");
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(matches!(identify(ours, &AtomicBool::new(false)), Some(Err(_))));
    }

    #[test]
    fn a_stranger_is_named_by_its_process() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        assert_eq!(peer_of(&ours), format!("pid {} (uid {uid})", std::process::id()));
    }

    #[test]
    fn a_silent_or_half_said_connection_waits_until_the_session_is_over() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"QEVM").unwrap();
        let over = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        look_at(ours, tx, over.clone());
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "nothing to say yet");
        over.store(true, Ordering::Release);
        assert!(rx.recv_timeout(Duration::from_secs(2)).is_err(), "let go without an arrival");
    }
}

//! Stacks as the engine sees them: a `Connector` for the source and an `Acceptor` for the
//! destination, each backed by a dataplane core.

use crate::core::{Command, CoreConfig, CoreHandle, DeviceWrappers};
use crate::pipe::{connection, PipeShared};
use crate::wire::wire_pair;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use std::io;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;
use transport::abort::SessionAbort;
use transport::pipe::{Acceptor, Connection, Connector, Timeouts};
use transport::ring::Ring;

/// Socket buffers of 1 MiB: a window large enough for ~10 Gbit/s at 1 ms RTT, and small
/// enough that a core with several connections stays within its caches' reach.
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 1 << 20;

/// Connections waiting to be accepted per listener.
const ACCEPT_QUEUE: usize = 64;

/// Opens connections through a core.
pub struct CoreConnector {
    core: Arc<CoreHandle>,
    remote: IpEndpoint,
    timeouts: Timeouts,
}

impl Connector for CoreConnector {
    fn connect(&self) -> io::Result<Connection> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.core.send(Command::Connect { remote: self.remote, reply })?;
        let shared = answer
            .recv_timeout(self.timeouts.connect)
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {}: timed out", self.remote)))??;
        Ok(connection(shared, self.remote.to_string(), self.timeouts.io))
    }
}

/// Accepts connections on a core's listening port.
pub struct CoreAcceptor {
    _core: Arc<CoreHandle>,
    accepted: Arc<Ring<Arc<PipeShared>>>,
    local: String,
    timeouts: Timeouts,
    never: SessionAbort,
}

impl Acceptor for CoreAcceptor {
    fn accept(&mut self, timeout: Duration) -> io::Result<Connection> {
        match self.accepted.pop_timeout(&self.never, timeout) {
            Ok(Some(shared)) => Ok(connection(shared, "peer".into(), self.timeouts.io)),
            _ => Err(io::Error::new(io::ErrorKind::TimedOut, "no connection from the source in time")),
        }
    }

    fn local_addr(&self) -> String {
        self.local.clone()
    }
}

/// One dataplane core on one NIC backend, with our own address on its link.
pub struct CoreStack {
    core: Arc<CoreHandle>,
    ip: Ipv4Address,
}

impl CoreStack {
    /// A core on the TAP device `iface`, owning `ip` (with its prefix) and `mac`.
    pub fn tap(
        iface: &str,
        ip: IpCidr,
        mac: EthernetAddress,
        gateway: Option<Ipv4Address>,
        socket_buffer_bytes: usize,
        pin_core: Option<usize>,
        wrappers: DeviceWrappers,
    ) -> io::Result<CoreStack> {
        let IpAddress::Ipv4(address) = ip.address();
        let name = iface.to_string();
        let config = CoreConfig {
            name: format!("dataplane-{iface}"),
            mac,
            ip,
            gateway,
            socket_buffer_bytes,
            pin_core,
            wrappers,
        };
        let core = CoreHandle::start(move || crate::tap::open_tap(&name), config)?;
        Ok(CoreStack { core: Arc::new(core), ip: address })
    }

    pub fn connector(&self, remote: SocketAddrV4, timeouts: Timeouts) -> CoreConnector {
        CoreConnector {
            core: self.core.clone(),
            remote: IpEndpoint::new((*remote.ip()).into(), remote.port()),
            timeouts,
        }
    }

    pub fn acceptor(&self, port: u16, timeouts: Timeouts) -> io::Result<CoreAcceptor> {
        let accepted = Arc::new(Ring::new(ACCEPT_QUEUE));
        self.core.send(Command::Listen { port, accepted: accepted.clone() })?;
        Ok(CoreAcceptor {
            _core: self.core.clone(),
            accepted,
            local: format!("{}:{port}", self.ip),
            timeouts,
            never: SessionAbort::new(),
        })
    }
}

/// Two dataplane cores joined by the in-process wire: the source's stack and the
/// destination's, in one process, with no kernel networking at all.
pub struct LoopbackStack {
    source: Arc<CoreHandle>,
    destination: Arc<CoreHandle>,
}

const SOURCE_IP: Ipv4Address = Ipv4Address::new(127, 0, 0, 1);
const DESTINATION_IP: Ipv4Address = Ipv4Address::new(127, 0, 0, 2);

impl LoopbackStack {
    /// `pin`: pin the two cores to the last cores of the machine (the engine's workers start
    /// from the first).
    pub fn start(mtu: usize, socket_buffer_bytes: usize, pin: bool) -> io::Result<LoopbackStack> {
        Self::start_with(mtu, socket_buffer_bytes, pin, DeviceWrappers::default())
    }

    /// As [`LoopbackStack::start`], with `wrappers` around both ends of the wire (each end
    /// draws its faults from its own seed, derived from `wrappers.seed`; a pcap file, if
    /// any, records the source's end).
    pub fn start_with(
        mtu: usize,
        socket_buffer_bytes: usize,
        pin: bool,
        wrappers: DeviceWrappers,
    ) -> io::Result<LoopbackStack> {
        let (a, b) = wire_pair(mtu);
        let cores = transport::pin::core_count();
        let config = |name: &str, mac: [u8; 6], ip: Ipv4Address, core: usize, wrappers: DeviceWrappers| CoreConfig {
            name: name.into(),
            mac: EthernetAddress(mac),
            ip: IpCidr::new(ip.into(), 8),
            gateway: None,
            socket_buffer_bytes,
            pin_core: pin.then_some(core),
            wrappers,
        };
        let destination_wrappers =
            DeviceWrappers { seed: wrappers.seed.wrapping_add(1), pcap: None, ..wrappers.clone() };
        let source_config = config("dataplane-src", [2, 0, 0, 0, 0, 1], SOURCE_IP, cores.saturating_sub(1), wrappers);
        let source = CoreHandle::start(move || Ok(a), source_config)?;
        let destination_config =
            config("dataplane-dst", [2, 0, 0, 0, 0, 2], DESTINATION_IP, cores.saturating_sub(2), destination_wrappers);
        let destination = CoreHandle::start(move || Ok(b), destination_config)?;
        Ok(LoopbackStack { source: Arc::new(source), destination: Arc::new(destination) })
    }

    pub fn connector(&self, port: u16, timeouts: Timeouts) -> CoreConnector {
        CoreConnector { core: self.source.clone(), remote: IpEndpoint::new(DESTINATION_IP.into(), port), timeouts }
    }

    pub fn acceptor(&self, port: u16, timeouts: Timeouts) -> io::Result<CoreAcceptor> {
        let accepted = Arc::new(Ring::new(ACCEPT_QUEUE));
        self.destination.send(Command::Listen { port, accepted: accepted.clone() })?;
        Ok(CoreAcceptor {
            _core: self.destination.clone(),
            accepted,
            local: format!("{DESTINATION_IP}:{port} (loopback wire)"),
            timeouts,
            never: SessionAbort::new(),
        })
    }
}

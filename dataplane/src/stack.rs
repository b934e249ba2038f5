//! Stacks as the engine sees them: a `Connector` for the source and an `Acceptor` for the
//! destination, each backed by a dataplane core.

use crate::af_packet::{AfPacket, AfPacketOptions};
use crate::core::{Command, Congestion, CoreConfig, CoreHandle, DeviceWrappers, IdlePolicy};
use crate::fanout::{FanoutGroup, SharedFrames, SharedLink, Steering};
use crate::layers::ChecksumPolicy;
use crate::pipe::{connection, PipeShared};
use crate::wire::wire_pair;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use std::io;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Opens connections through one or more cores: each new connection goes to the next core
/// in turn (and to the peer address that core reaches), so the connections of a migration
/// spread over the cores and each core owns its own.
pub struct CoreConnector {
    routes: Vec<(Arc<CoreHandle>, IpEndpoint)>,
    next: AtomicUsize,
    timeouts: Timeouts,
}

impl CoreConnector {
    fn new(routes: Vec<(Arc<CoreHandle>, IpEndpoint)>, timeouts: Timeouts) -> Self {
        CoreConnector { routes, next: AtomicUsize::new(0), timeouts }
    }
}

impl Connector for CoreConnector {
    fn connect(&self) -> io::Result<Connection> {
        let (core, remote) = &self.routes[self.next.fetch_add(1, Ordering::Relaxed) % self.routes.len()];
        let remote = *remote;
        let (reply, answer) = std::sync::mpsc::channel();
        core.send(Command::Connect { remote, reply })?;
        let shared = answer
            .recv_timeout(self.timeouts.connect)
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {remote}: timed out")))??;
        Ok(connection(shared, remote.to_string(), self.timeouts.io))
    }
}

/// Accepts connections on a core's listening port.
pub struct CoreAcceptor {
    _cores: Vec<Arc<CoreHandle>>,
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

/// The NIC backend under the cores of a `CoreStack`.
#[derive(Clone)]
pub enum NicBackend {
    /// One queue per core of a multi-queue TAP device.
    Tap,
    /// One packet socket per core on the interface, in a fanout group that steers flows.
    AfPacket { qdisc_bypass: bool },
    /// One RX/TX queue pair per core of a started DPDK port. Each core holds the port
    /// until it stops, so whoever started it can close it once the cores are gone (and then
    /// count the pool's mbufs). `segments`: the pools for large segments
    /// (`dpdk::segments`), used where offload is, and whether they go whole.
    #[cfg(feature = "dpdk")]
    Dpdk {
        port: Arc<dpdk::Port<'static>>,
        pool: &'static dpdk::Mempool,
        segments: Option<crate::dpdk_nic::LargeSegments>,
    },
}

/// Dataplane cores on one interface, with our own address on its link. Each core owns one
/// queue of the interface and the connections the flow rule (`fanout`) gives it; they share
/// the address and MAC, and nothing but rings.
pub struct CoreStack {
    cores: Vec<Arc<CoreHandle>>,
    ip: Ipv4Address,
    /// Runs once the cores have stopped (e.g. closing the DPDK port they polled).
    teardown: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for CoreStack {
    /// Stops every core, even one a connector or acceptor still refers to: the stack owns
    /// its cores, and its teardown must find their devices gone.
    fn drop(&mut self) {
        for core in &self.cores {
            core.stop();
        }
        if let Some(teardown) = self.teardown.take() {
            teardown();
        }
    }
}

impl CoreStack {
    /// `cores` cores on `iface` with `config`'s address, MAC and settings; core i is pinned
    /// i places below `config.pin_core` (the cores are counted down from the last one, the
    /// engine's workers up from the first).
    pub fn start(backend: NicBackend, iface: &str, cores: usize, config: CoreConfig) -> io::Result<CoreStack> {
        let IpAddress::Ipv4(address) = config.ip.address();
        let count = cores.max(1);
        let shared = SharedFrames::new(count);
        let group = match backend {
            NicBackend::AfPacket { .. } if count > 1 => Some(FanoutGroup::new(count)),
            _ => None,
        };
        #[cfg(feature = "dpdk")]
        let inboxes = crate::dpdk_nic::Inboxes::new(count);
        let machine = transport::pin::core_count().max(1);
        let mut handles = Vec::with_capacity(count);
        // Cores start one after another: a packet socket's place in the fanout group is
        // the order in which it joined, and it must equal its core's index.
        for core in 0..count {
            let config = CoreConfig {
                name: if count > 1 { format!("{}-{core}", config.name) } else { config.name.clone() },
                pin_core: config.pin_core.map(|first| (first + machine - core % machine) % machine),
                steering: (count > 1).then_some(Steering { core, cores: count }),
                // One capture file (the first core's); each core its own fault seed.
                wrappers: DeviceWrappers {
                    seed: config.wrappers.seed.wrapping_add(core as u32),
                    pcap: if core == 0 { config.wrappers.pcap.clone() } else { None },
                    ..config.wrappers.clone()
                },
                ..config.clone()
            };
            let name = iface.to_string();
            let shared = shared.clone();
            let handle = match backend.clone() {
                NicBackend::Tap => CoreHandle::start(
                    {
                        let (offload, verify) =
                            (config.offload_in_use(), config.wrappers.checksum == ChecksumPolicy::Full);
                        move || {
                            let queue = crate::tap::open_tap(&name, count, offload, verify)?;
                            Ok(SharedLink::new(queue, shared, core, count > 1))
                        }
                    },
                    config,
                )?,
                NicBackend::AfPacket { qdisc_bypass } => {
                    let group = group.clone();
                    // Large segments that bypass the qdisc layer (`dev_direct_xmit`, which
                    // skips the kernel's software fallbacks for the device) stalled the
                    // connection on a veth (Linux 6.18): bypass sends MTU-sized frames.
                    let options = AfPacketOptions {
                        qdisc_bypass,
                        offload: config.offload_in_use() && !qdisc_bypass,
                        verify_receive: config.wrappers.checksum == ChecksumPolicy::Full,
                    };
                    CoreHandle::start(
                        move || {
                            let socket = AfPacket::open(&name, options, group.as_ref())?;
                            Ok(SharedLink::new(socket, shared, core, false))
                        },
                        config,
                    )?
                }
                #[cfg(feature = "dpdk")]
                NicBackend::Dpdk { port, pool, segments } => {
                    let verify = config.wrappers.checksum == ChecksumPolicy::Full;
                    let merge = config.offload_in_use();
                    let segments = segments.filter(|_| merge);
                    let steering = config.steering.map(|at| (at, inboxes.clone()));
                    CoreHandle::start(
                        // RSS spreads flows by its own hash, not our rule: the queue hands
                        // other cores' frames to them itself (mbufs, no copy), and the
                        // shared link passes on only what is not TCP.
                        move || {
                            let queue = crate::dpdk_nic::DpdkQueue::new(
                                port,
                                pool,
                                core as u16,
                                verify,
                                merge,
                                segments,
                                steering,
                            );
                            Ok(SharedLink::new(queue, shared, core, false))
                        },
                        config,
                    )?
                }
            };
            handles.push(Arc::new(handle));
        }
        Ok(CoreStack { cores: handles, ip: address, teardown: None })
    }

    /// Runs `teardown` when the stack is dropped, after its cores have stopped.
    pub fn on_teardown(mut self, teardown: impl FnOnce() + Send + 'static) -> CoreStack {
        self.teardown = Some(Box::new(teardown));
        self
    }

    /// The cores' figures (busy time, connections' RTT and retransmissions).
    pub fn meter(&self) -> crate::stats::StackMeter {
        crate::stats::StackMeter(self.cores.iter().map(|core| core.published()).collect())
    }

    /// Opens connections to `remote` through every core in turn.
    pub fn connector(&self, remote: SocketAddrV4, timeouts: Timeouts) -> CoreConnector {
        let endpoint = IpEndpoint::new((*remote.ip()).into(), remote.port());
        CoreConnector::new(self.cores.iter().map(|core| (core.clone(), endpoint)).collect(), timeouts)
    }

    /// Listens on `port` on every core: a connection is accepted by the core its flow
    /// lands on.
    pub fn acceptor(&self, port: u16, timeouts: Timeouts) -> io::Result<CoreAcceptor> {
        let accepted = Arc::new(Ring::new(ACCEPT_QUEUE));
        for core in &self.cores {
            core.send(Command::Listen { port, accepted: accepted.clone() })?;
        }
        Ok(CoreAcceptor {
            _cores: self.cores.clone(),
            accepted,
            local: format!("{}:{port}", self.ip),
            timeouts,
            never: SessionAbort::new(),
        })
    }
}

/// Settings of a loopback stack.
#[derive(Debug, Clone)]
pub struct LoopbackOptions {
    pub mtu: usize,
    pub socket_buffer_bytes: usize,
    /// Dataplane cores per side; core i of the source is wired to core i of the
    /// destination, and connections spread over the pairs.
    pub cores: usize,
    /// Pin the cores to the last cores of the machine (the engine's workers start from the
    /// first).
    pub pin: bool,
    /// Around every wire end (each end draws faults from its own seed; a pcap file records
    /// the first source core's end).
    pub wrappers: DeviceWrappers,
    pub congestion: Congestion,
    pub idle: IdlePolicy,
    pub min_rto: Duration,
    /// Large frames without checksums on the wires (`wire`'s offload); never while faults
    /// are injected, whose corruption only checksums catch.
    pub offload: bool,
}

impl Default for LoopbackOptions {
    fn default() -> Self {
        LoopbackOptions {
            mtu: 1500,
            socket_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            cores: 1,
            pin: false,
            wrappers: DeviceWrappers::default(),
            congestion: Congestion::default(),
            idle: IdlePolicy::default(),
            min_rto: crate::core::DEFAULT_MIN_RTO,
            offload: true,
        }
    }
}

/// Dataplane cores joined in pairs by in-process wires: the source's stack and the
/// destination's, in one process, with no kernel networking at all.
pub struct LoopbackStack {
    /// (source core, destination core, destination address) per wire.
    pairs: Vec<(Arc<CoreHandle>, Arc<CoreHandle>, Ipv4Address)>,
}

impl Drop for LoopbackStack {
    fn drop(&mut self) {
        self.stop();
    }
}

impl LoopbackStack {
    pub fn start(mtu: usize, socket_buffer_bytes: usize, pin: bool) -> io::Result<LoopbackStack> {
        Self::start_with(LoopbackOptions { mtu, socket_buffer_bytes, pin, ..LoopbackOptions::default() })
    }

    pub fn start_with(options: LoopbackOptions) -> io::Result<LoopbackStack> {
        let machine_cores = transport::pin::core_count();
        let mut pairs = Vec::new();
        for pair in 0..options.cores.clamp(1, 250) {
            let (a, b) = wire_pair(options.mtu, options.offload && options.wrappers.allow_offload());
            // Each wire is its own /24 in 127/8: frames never leave the process.
            let subnet = pair as u8;
            let source_ip = Ipv4Address::new(127, 0, subnet, 1);
            let destination_ip = Ipv4Address::new(127, 0, subnet, 2);
            let config = |name: String, host: u8, ip: Ipv4Address, core: usize, wrappers: DeviceWrappers| CoreConfig {
                name,
                mac: EthernetAddress([2, 0, 0, 0, subnet, host]),
                ip: IpCidr::new(ip.into(), 24),
                gateway: None,
                socket_buffer_bytes: options.socket_buffer_bytes,
                pin_core: options.pin.then_some(core),
                wrappers,
                congestion: options.congestion,
                idle: options.idle,
                min_rto: options.min_rto,
                steering: None,
                offload: options.offload,
            };
            let seed = options.wrappers.seed.wrapping_add(2 * pair as u32);
            let source_wrappers = DeviceWrappers {
                seed,
                pcap: if pair == 0 { options.wrappers.pcap.clone() } else { None },
                ..options.wrappers.clone()
            };
            let destination_wrappers =
                DeviceWrappers { seed: seed.wrapping_add(1), pcap: None, ..options.wrappers.clone() };
            let source_core = (machine_cores + machine_cores - 1 - (2 * pair) % machine_cores) % machine_cores;
            let destination_core = (source_core + machine_cores - 1) % machine_cores;
            let source = CoreHandle::start(
                move || Ok(a),
                config(format!("dataplane-src-{pair}"), 1, source_ip, source_core, source_wrappers),
            )?;
            let destination = CoreHandle::start(
                move || Ok(b),
                config(format!("dataplane-dst-{pair}"), 2, destination_ip, destination_core, destination_wrappers),
            )?;
            pairs.push((Arc::new(source), Arc::new(destination), destination_ip));
        }
        Ok(LoopbackStack { pairs })
    }

    /// Stops every core, both sides at once (see `CoreHandle::stop_together`); a connector or
    /// acceptor that still refers to one finds it stopped.
    pub fn stop(&self) {
        let cores: Vec<&CoreHandle> =
            self.pairs.iter().flat_map(|(source, destination, _)| [&**source, &**destination]).collect();
        CoreHandle::stop_together(&cores);
    }

    /// Stops the source side's cores (those connections are made from), as the exit of a
    /// sending process would, while the destination side's keep running.
    pub fn stop_sources(&self) {
        for (source, _, _) in &self.pairs {
            source.stop();
        }
    }

    /// The source side's cores and the destination side's, for their figures.
    pub fn meters(&self) -> (crate::stats::StackMeter, crate::stats::StackMeter) {
        let (sources, destinations) =
            self.pairs.iter().map(|(source, destination, _)| (source.published(), destination.published())).unzip();
        (crate::stats::StackMeter(sources), crate::stats::StackMeter(destinations))
    }

    pub fn connector(&self, port: u16, timeouts: Timeouts) -> CoreConnector {
        let routes =
            self.pairs.iter().map(|(source, _, ip)| (source.clone(), IpEndpoint::new((*ip).into(), port))).collect();
        CoreConnector::new(routes, timeouts)
    }

    pub fn acceptor(&self, port: u16, timeouts: Timeouts) -> io::Result<CoreAcceptor> {
        // Every destination core listens; accepted connections from all of them queue here.
        let accepted = Arc::new(Ring::new(ACCEPT_QUEUE));
        for (_, destination, _) in &self.pairs {
            destination.send(Command::Listen { port, accepted: accepted.clone() })?;
        }
        Ok(CoreAcceptor {
            _cores: self.pairs.iter().map(|(_, destination, _)| destination.clone()).collect(),
            accepted,
            local: format!("127.0.0.2:{port} (loopback wire, {} core(s) per side)", self.pairs.len()),
            timeouts,
            never: SessionAbort::new(),
        })
    }
}

//! A dataplane core: one pinned thread that owns one NIC device, one smoltcp `Interface`
//! and the TCP sockets of its connections, and polls them in a loop with bounded work per
//! iteration: ingress and egress through smoltcp, then at most `connection::PUMP_BUDGET_BYTES` each
//! way per connection between the sockets and the application rings.

use crate::clock::StackClock;
use crate::connection::Pipe;
pub use crate::core_config::{Congestion, CoreConfig, DeviceWrappers, IdlePolicy, DEFAULT_MIN_RTO};
use crate::fanout::{local_port_for, Steering};
use crate::faults::FaultyDevice;
use crate::layers::{trace_frame, Checksums};
use crate::pipe::PipeShared;
use crate::stats::{ConnectionStats, CoreMeter, CoreStats};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, PcapMode, PcapWriter, Tracer};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpEndpoint;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use transport::ring::Ring;

/// Frames taken from the device per loop iteration, so a flood cannot starve the pumps.
const INGRESS_BUDGET: usize = 256;
/// Frames received between egress passes. smoltcp acknowledges once per egress pass, and
/// its congestion control grows the window by one segment per ACK in slow start: one ACK
/// per burst of dozens of frames held the window nearly flat. An ACK every second
/// segment is what RFC 5681 asks of a receiver, and gives the sender its ACK clock.
const ACK_EVERY_FRAMES: usize = 2;
/// Idle iterations spent yielding before the core starts to nap: a polling core on a
/// dedicated CPU never naps in practice, and one on a shared machine gives the CPU back.
const IDLE_YIELDS: u32 = 2000;
const IDLE_NAP: Duration = Duration::from_micros(50);
/// How long a stopping core keeps delivering what closed connections still had to send,
/// as a kernel socket's close does before the process exits.
const LINGER: Duration = Duration::from_secs(2);
/// Listening sockets kept ready per port, so that a burst of connections (one per
/// migration stream) is accepted without waiting for the core to re-arm.
const SPARE_LISTENERS: usize = 4;
/// First ephemeral port of a core's outgoing connections (IANA's dynamic range).
const EPHEMERAL_PORT_BASE: u16 = 49152;

/// Whether a connection in `state` may still have bytes or its FIN to get acknowledged: a
/// stopping core lingers for it. (Opening ones are cut, as are those whose FIN the peer has.)
fn delivering(state: State) -> bool {
    matches!(state, State::Established | State::CloseWait | State::FinWait1 | State::Closing | State::LastAck)
}

pub(crate) enum Command {
    Connect { remote: IpEndpoint, reply: mpsc::Sender<io::Result<Arc<PipeShared>>> },
    Listen { port: u16, accepted: Arc<Ring<Arc<PipeShared>>> },
}

/// How a core is told to stop, and with whom.
#[derive(Default)]
struct StopSignal {
    requested: AtomicBool,
    /// Set when the core stops together with others (`CoreHandle::stop_together`): how many
    /// of them are still lingering. A core done with its own connections keeps answering
    /// until it reaches zero, since a peer core's FIN may still need its acknowledgement.
    together: OnceLock<Arc<AtomicUsize>>,
}

/// A running core. Dropping it (or `stop`) stops the thread.
pub struct CoreHandle {
    commands: mpsc::Sender<Command>,
    stop: Arc<StopSignal>,
    stats: Arc<CoreStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CoreHandle {
    /// Starts a core on the device `open` makes. The device is opened on the core's own
    /// thread (a NIC queue belongs to the core that polls it, and some devices cannot
    /// move between threads); an error opening it is returned here.
    pub fn start<D, F>(open: F, config: CoreConfig) -> io::Result<CoreHandle>
    where
        D: Device + 'static,
        F: FnOnce() -> io::Result<D> + Send + 'static,
    {
        let (commands, receiver) = mpsc::channel();
        let (opened, open_result) = mpsc::channel();
        let stop = Arc::new(StopSignal::default());
        let flag = stop.clone();
        let stats = Arc::new(CoreStats::named(&config.name));
        let published = stats.clone();
        let thread = std::thread::Builder::new().name(config.name.clone()).spawn(move || {
            let device = match open() {
                Ok(device) => device,
                Err(err) => {
                    let _ = opened.send(Err(err));
                    return;
                }
            };
            let device = Checksums::new(device, config.wrappers.checksum);
            let run = Run { config, opened, commands: receiver, stop: &flag, stats: published };
            // Wrapped only when asked to: the wrapper copies every frame it receives.
            let wrappers = run.config.wrappers.clone();
            if wrappers.faults.any() {
                let faulty = FaultyDevice::new(device, wrappers.faults, u64::from(wrappers.seed));
                run_traced(faulty, run);
            } else {
                run_traced(device, run);
            }
        })?;
        let handle = CoreHandle { commands, stop, stats, thread: Mutex::new(Some(thread)) };
        open_result.recv().map_err(|_| io::Error::other("the dataplane core died while opening its device"))??;
        Ok(handle)
    }

    /// Where the core publishes its figures (every 100 ms), for a `StackMeter`.
    pub(crate) fn published(&self) -> Arc<CoreStats> {
        self.stats.clone()
    }

    pub(crate) fn send(&self, command: Command) -> io::Result<()> {
        self.commands.send(command).map_err(|_| io::Error::other("the dataplane core has stopped"))
    }

    /// Stops the core and waits until its thread, and so its device, is gone. Idempotent.
    /// Connections it carried fail from then on.
    pub fn stop(&self) {
        self.stop.requested.store(true, Ordering::Release);
        self.join();
    }

    /// Stops these cores at once, each answering the others until all are done lingering:
    /// for cores that are each other's peers (both ends of an in-process wire). Stopped one
    /// after the other, the first could go while the second's FIN still waited for its
    /// acknowledgement, and the second resent it until its linger ran out.
    pub fn stop_together(cores: &[&CoreHandle]) {
        let running: Vec<_> = cores.iter().filter(|core| core.running()).collect();
        let lingering = Arc::new(AtomicUsize::new(running.len()));
        for core in &running {
            let _ = core.stop.together.set(lingering.clone());
            core.stop.requested.store(true, Ordering::Release);
        }
        for core in cores {
            core.join();
        }
    }

    fn running(&self) -> bool {
        self.thread.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().is_some_and(|t| !t.is_finished())
    }

    fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for CoreHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a core's thread runs with, beside its device.
struct Run<'a> {
    config: CoreConfig,
    /// Told whether the core started.
    opened: mpsc::Sender<io::Result<()>>,
    commands: mpsc::Receiver<Command>,
    stop: &'a StopSignal,
    stats: Arc<CoreStats>,
}

/// Runs a core on `device`, behind a tracer if the configuration asks for one.
fn run_traced<D: Device>(device: D, run: Run<'_>) {
    if run.config.wrappers.trace {
        run_captured(Tracer::new(device, trace_frame), run);
    } else {
        run_captured(device, run);
    }
}

/// Runs a core on `device`, behind a pcap writer if the configuration asks for one, and
/// reports on `opened` whether it started.
fn run_captured<D: Device>(device: D, run: Run<'_>) {
    let Run { config, opened, commands, stop, stats } = run;
    match config.wrappers.pcap.as_ref().map(std::fs::File::create).transpose() {
        Err(err) => {
            let _ = opened.send(Err(err));
        }
        Ok(None) => {
            let _ = opened.send(Ok(()));
            Core::new(device, config, stats).run(commands, stop);
        }
        Ok(Some(file)) => {
            let _ = opened.send(Ok(()));
            let device = PcapWriter::new(device, std::io::BufWriter::new(file), PcapMode::Both);
            Core::new(device, config, stats).run(commands, stop);
        }
    }
}

struct Connecting {
    handle: SocketHandle,
    reply: mpsc::Sender<io::Result<Arc<PipeShared>>>,
    remote: IpEndpoint,
}

struct Listener {
    port: u16,
    accepted: Arc<Ring<Arc<PipeShared>>>,
    sockets: Vec<SocketHandle>,
}

struct Core<D: Device> {
    device: D,
    iface: Interface,
    sockets: SocketSet<'static>,
    config: CoreConfig,
    pipes: Vec<Pipe>,
    connecting: Vec<Connecting>,
    listeners: Vec<Listener>,
    next_port: u16,
    clock: StackClock,
    /// The stack's time at the last poll.
    now: smoltcp::time::Instant,
    meter: CoreMeter,
    stats: Arc<CoreStats>,
}

impl<D: Device> Core<D> {
    fn new(mut device: D, config: CoreConfig, stats: Arc<CoreStats>) -> Self {
        let clock = StackClock::new();
        let mut iface_config = Config::new(config.mac.into());
        // smoltcp draws each connection's initial sequence number from this seed. Its
        // default (0) gave every core in every run the same ones, which RFC 6528 forbids:
        // a blind attacker who knows them can inject into or reset a migration stream.
        iface_config.random_seed = rand::random();
        let mut iface = Interface::new(iface_config, &mut device, clock.now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(config.ip);
        });
        if let Some(gateway) = config.gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        }
        Core {
            device,
            iface,
            sockets: SocketSet::new(Vec::new()),
            config,
            pipes: Vec::new(),
            connecting: Vec::new(),
            listeners: Vec::new(),
            next_port: EPHEMERAL_PORT_BASE,
            now: clock.now(),
            meter: CoreMeter::new(clock.now()),
            stats,
            clock,
        }
    }

    fn new_socket(&mut self) -> SocketHandle {
        let bytes = self.config.socket_buffer_bytes;
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; bytes]), tcp::SocketBuffer::new(vec![0; bytes]));
        // Bulk transfer: full segments matter more than latency of small writes.
        socket.set_nagle_enabled(false);
        socket.set_min_retransmission_timeout(self.config.min_rto.into());
        socket.set_ack_delay(None);
        socket.set_congestion_control(match self.config.congestion {
            Congestion::None => tcp::CongestionControl::None,
            Congestion::Reno => tcp::CongestionControl::Reno,
            Congestion::Cubic => tcp::CongestionControl::Cubic,
        });
        self.sockets.add(socket)
    }

    fn run(mut self, commands: mpsc::Receiver<Command>, stop: &StopSignal) {
        // The first free CPU from the one asked for down, held against every other polling
        // core on the host until this core stops; none free: run unpinned.
        let _cpu = self.config.pin_core.and_then(transport::pin::claim_cpu);
        // Counted for adaptive compression: a worker sharing this core's CPU gets its share.
        let _registered = transport::pin::PollingCore::register();
        let mut idle = 0u32;
        while !stop.requested.load(Ordering::Acquire) {
            while let Ok(command) = commands.try_recv() {
                self.handle(command);
            }
            self.iterate(&mut idle);
        }
        // Linger: every connection delivers what its application wrote, and its FIN,
        // within a bound, as a kernel's sockets do when their process exits. That includes
        // connections the application still holds: a relay's session can end, and its
        // process tear the stack down, while a thread that has not woken yet still holds a
        // clone of a connection whose last frame (the stream's end) is still queued here;
        // cut, the peer waited for it until its I/O timeout. Done once the peer has
        // acknowledged the FIN: what the peer sends after it has no reader left.
        for pipe in &mut self.pipes {
            pipe.released = true;
        }
        let deadline = std::time::Instant::now() + LINGER;
        while self.pipes.iter().any(|pipe| delivering(self.sockets.get::<tcp::Socket>(pipe.handle).state()))
            && std::time::Instant::now() < deadline
        {
            self.iterate(&mut idle);
        }
        if let Some(lingering) = stop.together.get() {
            lingering.fetch_sub(1, Ordering::AcqRel);
            while lingering.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
                self.iterate(&mut idle);
            }
        }
        // A last time, so that a reader after the stop sees the whole run.
        self.now = self.clock.now();
        self.meter.began(self.now);
        self.publish_stats();
    }

    /// One round of the core's loop: the stack, new connections, every pipe, cleanup; then
    /// a spin or a nap when nothing moved.
    fn iterate(&mut self, idle: &mut u32) {
        // One clock read per iteration (both stack passes use it): the read was 9% of a
        // stream's samples, most of them in the iterations of a core with nothing to do.
        self.now = self.clock.now();
        let mut progress = self.poll_stack();
        if self.meter.began(self.now) {
            self.publish_stats();
        }
        progress |= self.accept_and_connect();
        for index in 0..self.pipes.len() {
            progress |= self.pump(index);
        }
        self.reap();
        progress |= self.poll_stack();
        if progress {
            self.meter.moved();
            *idle = 0;
        } else {
            *idle = idle.saturating_add(1);
            match self.config.idle {
                IdlePolicy::YieldThenNap if *idle > IDLE_YIELDS => std::thread::sleep(IDLE_NAP),
                IdlePolicy::YieldThenNap => std::thread::yield_now(),
                IdlePolicy::Spin => std::hint::spin_loop(),
            }
        }
    }

    /// Runs the stack: timers, a bounded number of received frames with an egress pass
    /// after every `ACK_EVERY_FRAMES`, then egress until the sockets have nothing to send.
    /// Returns whether any frame came in.
    fn poll_stack(&mut self) -> bool {
        let now = self.now;
        self.iface.poll_maintenance(now);
        let mut frames = 0;
        while frames < INGRESS_BUDGET {
            if self.iface.poll_ingress_single(now, &mut self.device, &mut self.sockets) == PollIngressSingleResult::None
            {
                break;
            }
            frames += 1;
            if frames % ACK_EVERY_FRAMES == 0 {
                self.iface.poll_egress(now, &mut self.device, &mut self.sockets);
            }
        }
        while self.iface.poll_egress(now, &mut self.device, &mut self.sockets) != PollResult::None {}
        frames > 0
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Connect { remote, reply } => {
                let handle = self.new_socket();
                let port = match self.config.steering {
                    // The peer's segments must come back to this core: pick a port the
                    // interface's flow rule steers here.
                    Some(Steering { core, cores }) => {
                        local_port_for(core, cores, remote.port, self.next_port, EPHEMERAL_PORT_BASE)
                    }
                    None => self.next_port,
                };
                self.next_port = port.checked_add(1).unwrap_or(EPHEMERAL_PORT_BASE);
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                match socket.connect(self.iface.context(), remote, port) {
                    Ok(()) => self.connecting.push(Connecting { handle, reply, remote }),
                    Err(err) => {
                        self.sockets.remove(handle);
                        let _ = reply.send(Err(io::Error::other(format!("connect to {remote}: {err}"))));
                    }
                }
            }
            Command::Listen { port, accepted } => {
                let mut listener = Listener { port, accepted, sockets: Vec::new() };
                self.arm(&mut listener);
                self.listeners.push(listener);
            }
        }
    }

    /// Keeps `SPARE_LISTENERS` sockets listening on the listener's port.
    fn arm(&mut self, listener: &mut Listener) {
        while listener.sockets.len() < SPARE_LISTENERS {
            let handle = self.new_socket();
            if self.sockets.get_mut::<tcp::Socket>(handle).listen(listener.port).is_err() {
                self.sockets.remove(handle);
                return;
            }
            listener.sockets.push(handle);
        }
    }

    fn adopt(&mut self, handle: SocketHandle) -> Arc<PipeShared> {
        let shared = PipeShared::new();
        self.pipes.push(Pipe::new(handle, shared.clone()));
        shared
    }

    fn accept_and_connect(&mut self) -> bool {
        let mut progress = false;
        let mut index = 0;
        while index < self.connecting.len() {
            let state = self.sockets.get::<tcp::Socket>(self.connecting[index].handle).state();
            match state {
                State::Established => {
                    let connecting = self.connecting.swap_remove(index);
                    let shared = self.adopt(connecting.handle);
                    let _ = connecting.reply.send(Ok(shared));
                    progress = true;
                }
                State::Closed => {
                    let connecting = self.connecting.swap_remove(index);
                    self.sockets.remove(connecting.handle);
                    let error = io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("connect to {}: refused", connecting.remote),
                    );
                    let _ = connecting.reply.send(Err(error));
                    progress = true;
                }
                _ => index += 1,
            }
        }
        let mut listeners = std::mem::take(&mut self.listeners);
        for listener in &mut listeners {
            let mut kept = Vec::with_capacity(listener.sockets.len());
            for handle in std::mem::take(&mut listener.sockets) {
                if self.sockets.get::<tcp::Socket>(handle).state() == State::Established {
                    let shared = self.adopt(handle);
                    // A full accept queue means nobody accepts: refuse by closing.
                    if !listener.accepted.try_push(shared.clone()) {
                        shared.closed.raise("accept queue full");
                    }
                    progress = true;
                } else {
                    kept.push(handle);
                }
            }
            listener.sockets = kept;
            self.arm(listener);
        }
        self.listeners = listeners;
        progress
    }

    /// Moves bytes between one connection's socket and its application rings (or what
    /// the application handed over), and closes it once the application is done.
    fn pump(&mut self, index: usize) -> bool {
        let pipe = &mut self.pipes[index];
        let socket = self.sockets.get_mut::<tcp::Socket>(pipe.handle);
        let mut progress = pipe.send(socket, self.now);
        progress |= pipe.receive(socket, self.now);
        // The application closed (or dropped the connection): send what it wrote, then FIN.
        if pipe.application_gone() && !pipe.closing && pipe.drained() {
            socket.close();
            pipe.closing = true;
            progress = true;
        }
        progress
    }

    /// Frees the sockets of connections that are fully closed.
    /// Hands the meter's figures and every open connection's to the core's handle.
    fn publish_stats(&mut self) {
        let connections =
            self.pipes.iter().map(|pipe| ConnectionStats::of(self.sockets.get::<tcp::Socket>(pipe.handle))).collect();
        self.meter.publish(self.now, &self.stats, connections);
    }

    fn reap(&mut self) {
        let mut index = 0;
        while index < self.pipes.len() {
            let handle = self.pipes[index].handle;
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            let done = matches!(state, State::Closed | State::TimeWait) && self.pipes[index].closing;
            let lost = state == State::Closed && !self.pipes[index].closing;
            if lost {
                if let Some(mut outbound) = self.pipes[index].outbound.take() {
                    outbound.lost("the connection was reset");
                }
                if let Some(delivery) = self.pipes[index].delivery.as_mut() {
                    delivery.end(Err("the connection was reset"));
                }
            }
            if lost && !self.pipes[index].eof_sent && self.pipes[index].delivery.is_none() {
                // Reset by the peer: the application sees the end of the stream.
                if self.pipes[index].shared.from_net.try_push(Vec::new()) {
                    self.pipes[index].eof_sent = true;
                }
            }
            if done || (lost && self.pipes[index].application_gone()) {
                let pipe = self.pipes.swap_remove(index);
                self.meter.closed(self.sockets.get::<tcp::Socket>(pipe.handle));
                self.sockets.remove(pipe.handle);
            } else {
                index += 1;
            }
        }
    }
}

//! The stacks the command line chooses: the kernel's TCP, or our dataplane cores on a TAP
//! device, an interface (AF_PACKET) or a DPDK port, each wrapped in TLS when asked; and
//! the settings of those cores from the options.

use super::args::{ChecksumArg, CongestionArg, DataplaneOptions, IdleArg, NetStack, StackOptions, WrapperOptions};
use super::dpdk::PortRequest;
use super::exit::Failure;
use anyhow::{Context, Result};
use dataplane::core::{Congestion, CoreConfig, DeviceWrappers, IdlePolicy};
use dataplane::faults::Faults;
use dataplane::layers::ChecksumPolicy;
use dataplane::stack::{CoreStack, LoopbackOptions, NicBackend};
use dataplane::wire_types::{EthernetAddress, IpCidr};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use transport::pipe::{Acceptor, Connector, TcpAcceptor, TcpConnector, Timeouts};

/// Our userspace stack on the TAP device, interface (AF_PACKET) or DPDK port the options name.
fn user_stack(options: &StackOptions, pin: bool) -> Result<CoreStack> {
    let iface = options.iface.as_deref().context("--stack tap, af-packet and dpdk need --iface")?;
    let ip_text = options.ip.as_deref().context("--stack tap, af-packet and dpdk need --ip ADDR/PREFIX")?;
    let (address, prefix) = ip_text.split_once('/').context("--ip needs a prefix, e.g. 10.77.0.11/24")?;
    let address: Ipv4Addr = address.parse().with_context(|| format!("bad --ip address {address:?}"))?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).with_context(|| format!("bad --ip prefix {prefix:?}"))?;
    let mac = options.mac.as_deref().map(parse_mac).transpose()?;
    let mut config = core_config(iface, address, prefix, mac, &options.dataplane, &options.wrappers, pin);
    config.gateway = options.gateway;
    let cores = usize::from(options.dataplane.dataplane_cores);
    match options.stack {
        NetStack::AfPacket => {
            CoreStack::start(NicBackend::AfPacket { qdisc_bypass: options.qdisc_bypass }, iface, cores, config)
                .with_context(|| format!("starting the AF_PACKET dataplane on {iface}"))
        }
        NetStack::Dpdk => {
            let request = PortRequest {
                name: iface,
                cores,
                mtu: options.port_mtu,
                xstats: options.nic_xstats,
                whole_segments: options.whole_segments,
            };
            super::dpdk::stack(&options.eal, &request, config)
        }
        _ => CoreStack::start(NicBackend::Tap, iface, cores, config).context("starting the TAP dataplane"),
    }
}

/// The settings of our stack's cores on a real link: its own address, and a MAC address of
/// its own (default: 02:00 followed by the address).
pub(super) fn core_config(
    iface: &str,
    address: Ipv4Addr,
    prefix: u8,
    mac: Option<EthernetAddress>,
    dataplane: &DataplaneOptions,
    wrappers: &WrapperOptions,
    pin: bool,
) -> CoreConfig {
    let [a, b, c, d] = address.octets();
    CoreConfig {
        name: format!("dataplane-{iface}"),
        mac: mac.unwrap_or(EthernetAddress([0x02, 0x00, a, b, c, d])),
        ip: IpCidr::new(address.into(), prefix),
        gateway: None,
        socket_buffer_bytes: dataplane.socket_buffer as usize,
        pin_core: pin.then(|| transport::pin::core_count() - 1),
        wrappers: device_wrappers(wrappers),
        congestion: congestion(dataplane.congestion.unwrap_or(CongestionArg::Cubic)),
        idle: idle_policy(dataplane.idle),
        min_rto: Duration::from_millis(dataplane.min_rto_ms),
        steering: None,
        offload: !dataplane.no_offload,
    }
}

fn idle_policy(arg: IdleArg) -> IdlePolicy {
    match arg {
        IdleArg::Spin => IdlePolicy::Spin,
        IdleArg::Nap => IdlePolicy::YieldThenNap,
    }
}

pub(super) fn congestion(arg: CongestionArg) -> Congestion {
    match arg {
        CongestionArg::Cubic => Congestion::Cubic,
        CongestionArg::Reno => Congestion::Reno,
        CongestionArg::None => Congestion::None,
    }
}

pub(super) fn loopback_options(options: &DataplaneOptions) -> LoopbackOptions {
    LoopbackOptions {
        cores: usize::from(options.dataplane_cores),
        socket_buffer_bytes: options.socket_buffer as usize,
        congestion: congestion(options.congestion.unwrap_or(CongestionArg::None)),
        idle: idle_policy(options.idle),
        min_rto: Duration::from_millis(options.min_rto_ms),
        offload: !options.no_offload,
        ..LoopbackOptions::default()
    }
}

pub(super) fn device_wrappers(options: &WrapperOptions) -> DeviceWrappers {
    DeviceWrappers {
        faults: Faults {
            drop: options.fault_drop / 100.0,
            corrupt: options.fault_corrupt / 100.0,
            duplicate: options.fault_duplicate / 100.0,
            reorder: options.fault_reorder / 100.0,
            blackout: options.fault_blackout,
        },
        seed: options.fault_seed,
        pcap: options.pcap.clone(),
        trace: options.trace,
        checksum: match options.checksum {
            ChecksumArg::Full => ChecksumPolicy::Full,
            ChecksumArg::TrustReceive => ChecksumPolicy::TrustReceive,
        },
    }
}

fn parse_mac(text: &str) -> Result<EthernetAddress> {
    let bytes: Vec<u8> =
        text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>().ok().unwrap_or_default();
    let bytes: [u8; 6] =
        bytes.try_into().ok().with_context(|| format!("bad --mac {text:?}: expected six hex bytes"))?;
    Ok(EthernetAddress(bytes))
}

/// `--unsent-limit`, 0 for none.
fn unsent_limit(stack: &StackOptions) -> Option<usize> {
    nonzero(stack.unsent_limit)
}

/// A size option where 0 means the kernel's default.
fn nonzero(bytes: u64) -> Option<usize> {
    (bytes > 0).then(|| usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// The source's side of the stack the options choose.
/// Options only a DPDK port takes: on another stack they are refused, not ignored.
fn refuse_dpdk_options_elsewhere(stack: &StackOptions) -> Result<()> {
    if stack.stack == NetStack::Dpdk {
        return Ok(());
    }
    let given = [
        (stack.whole_segments, "--whole-segments"),
        (stack.port_mtu.is_some(), "--port-mtu"),
        (stack.nic_xstats, "--nic-xstats"),
    ];
    match given.iter().find(|(set, _)| *set) {
        Some((_, option)) => Err(Failure::usage(format!("{option} is for --stack dpdk"))),
        None => Ok(()),
    }
}

pub(super) fn connector_for(
    stack: &StackOptions,
    pin: bool,
    to: &str,
    timeouts: Timeouts,
) -> Result<(Box<dyn Connector>, Option<CoreStack>)> {
    refuse_dpdk_options_elsewhere(stack)?;
    let (connector, cores): (Box<dyn Connector>, _) = match stack.stack {
        NetStack::Kernel => {
            let connector = TcpConnector::new(to, timeouts)
                .with_context(|| format!("resolving {to}"))?
                .with_unsent_limit(unsent_limit(stack));
            (Box::new(connector), None)
        }
        NetStack::Tap | NetStack::AfPacket | NetStack::Dpdk => {
            let address: SocketAddrV4 = to.parse().with_context(|| format!("--to {to} is not IPV4-ADDRESS:PORT"))?;
            let cores = user_stack(stack, pin)?;
            (Box::new(cores.connector(address, timeouts)), Some(cores))
        }
    };
    Ok((super::tls::secure_connector(&stack.tls, connector, to)?, cores))
}

/// The destination's side of the stack the options choose.
pub(super) fn acceptor_for(
    stack: &StackOptions,
    pin: bool,
    listen: std::net::SocketAddr,
    timeouts: Timeouts,
) -> Result<(Box<dyn Acceptor>, Option<CoreStack>)> {
    refuse_dpdk_options_elsewhere(stack)?;
    let (acceptor, cores): (Box<dyn Acceptor>, _) = match stack.stack {
        NetStack::Kernel => {
            let acceptor = TcpAcceptor::bind(listen, timeouts)
                .with_context(|| format!("listening on {listen}"))?
                .with_unsent_limit(unsent_limit(stack))
                .with_receive_buffer(nonzero(stack.receive_buffer))
                .context("setting --receive-buffer")?;
            (Box::new(acceptor), None)
        }
        NetStack::Tap | NetStack::AfPacket | NetStack::Dpdk => {
            let cores = user_stack(stack, pin)?;
            let acceptor = cores.acceptor(listen.port(), timeouts)?;
            (Box::new(acceptor), Some(cores))
        }
    };
    Ok((super::tls::secure_acceptor(&stack.tls, acceptor)?, cores))
}

/// A number of seconds from the command line, `option` naming it in the error.
pub(super) fn seconds(option: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| Failure::usage(format!("{option} {value}: not a number of seconds")))
}

/// The shortest `--io-timeout`: several heartbeats fit in it (the engine's destination
/// sends one after 250 ms of quiet, the relays after 100 ms), so a quiet but live peer is
/// never taken for a dead one.
const MIN_IO_TIMEOUT: Duration = Duration::from_secs(1);

/// The connections' timeouts `--io-timeout` asks for.
pub(super) fn io_timeouts(value: f64) -> Result<Timeouts> {
    let io = seconds("--io-timeout", value)?;
    if io < MIN_IO_TIMEOUT {
        return Err(Failure::usage(format!(
            "--io-timeout {value}: at least {} s (a live peer may be quiet that long)",
            MIN_IO_TIMEOUT.as_secs()
        )));
    }
    Ok(Timeouts { io, ..Timeouts::default() })
}

use super::args::{
    Cli, Command, CommonOptions, DemoArgs, DemoStack, DestinationOptions, OnLimit, RecvArgs, SendArgs, SourceOptions,
};
use super::cores::CoreShare;
use super::dpdk::PortRequest;
use super::exit::{Exit, Failure};
use super::guest::{DestinationGuest, SourceGuest};
use super::report;
use super::stacks::{acceptor_for, connector_for, core_config, device_wrappers, io_timeouts, loopback_options};
use anyhow::{Context, Result};
use dataplane::stack::{CoreStack, LoopbackOptions, LoopbackStack};
use dataplane::stats::StackMeter;
use engine::cancel::Cancel;
use engine::config::{DestinationConfig, SourceConfig};
use engine::destination::{receive, DestinationReport};
use engine::source::migrate;
use migration::precopy::{LimitAction, PrecopyConfig};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::Duration;
use transport::pipe::{Acceptor, Connector, TcpAcceptor, TcpConnector, Timeouts};

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Bench(args) => super::bench::run(args),
        Command::Send(args) => send(args),
        Command::Recv(args) => recv(args),
        Command::StreamSend(args) => {
            let connector = connector_for(&args.stack, !args.no_pin, &args.to, Timeouts::default())?;
            super::stream::send(&*connector.0, args.bytes, args.streams, stream_pump(args.connection_threads))
        }
        Command::StreamRecv(args) => {
            let (mut acceptor, _stack) = acceptor_for(&args.stack, !args.no_pin, args.listen, Timeouts::default())?;
            eprintln!("vmigrate: waiting for a stream on {}", acceptor.local_addr());
            super::stream::receive(&mut *acceptor, args.streams, stream_pump(args.connection_threads))
        }
        Command::QemuSend(args) => super::relay::qemu_send(args),
        Command::QemuRecv(args) => super::relay::qemu_recv(args),
        Command::QemuMigrate(args) => super::qemu_migrate::qemu_migrate(args),
        Command::Completions { shell } => super::docs::completions(shell),
        Command::Man { dir } => super::docs::man_pages(&dir),
        Command::StreamLoopback(args) => {
            let options = LoopbackOptions { mtu: args.mtu, pin: !args.no_pin, ..loopback_options(&args.dataplane) };
            let streams = args.streams.unwrap_or(options.cores);
            super::stream::loopback(args.bytes, options, streams, &args.tls, stream_pump(args.connection_threads))
        }
    }
}

/// Who moves a benchmark stream's bytes, from `--connection-threads`.
fn stream_pump(connection_threads: bool) -> super::stream::Pump {
    if connection_threads {
        super::stream::Pump::Threads
    } else {
        super::stream::Pump::Core
    }
}

/// The connections' timeouts `--io-timeout` asks for.
fn timeouts(common: &CommonOptions) -> Result<Timeouts> {
    io_timeouts(common.io_timeout)
}

fn source_config(args: &SourceOptions, common: &CommonOptions, cores: CoreShare) -> SourceConfig {
    SourceConfig {
        codec: args.codec,
        compress_threads: cores.workers(args.compress_threads),
        xbzrle_cache_bytes: super::args::xbzrle_cache(args.xbzrle, args.xbzrle_cache),
        copy_index_bytes: match args.copy_index {
            Some(0) => None,
            Some(bytes) => Some(bytes),
            None => Some(migration::seen_pages::DEFAULT_INDEX_BYTES),
        },
        connections: args.connections,
        precopy: PrecopyConfig {
            downtime_limit: Duration::from_millis(args.downtime_limit),
            max_rounds: args.max_rounds,
            timeout: args.precopy_timeout.map(Duration::from_secs_f64),
            on_limit: match args.on_limit {
                OnLimit::Switchover => LimitAction::Switchover,
                OnLimit::Cancel => LimitAction::Cancel,
            },
            auto_converge: args.auto_converge,
            ..PrecopyConfig::default()
        },
        max_bandwidth_bytes_per_s: args.max_bandwidth,
        skip_unused: !args.no_skip_unused,
        zero_detect: !args.no_zero_detect,
        deferred_cleanup: !common.no_deferred_cleanup,
        verify: args.verify,
        pin_workers: !common.no_pin,
        direct_send: !common.connection_threads,
        ..SourceConfig::default()
    }
}

fn destination_config(
    args: &DestinationOptions,
    common: &CommonOptions,
    cores: CoreShare,
    max_memory_bytes: u64,
    accept_timeout: Duration,
) -> DestinationConfig {
    DestinationConfig {
        decompress_threads: cores.destination_workers(args.decompress_threads),
        max_memory_bytes,
        pin_workers: !common.no_pin,
        first_worker_cpu: 0,
        accept_timeout,
        deferred_cleanup: !common.no_deferred_cleanup,
        direct_receive: !common.connection_threads,
        controls: None,
        offload: None,
    }
}

/// The two ends of the demo's link: a connector for the source, an acceptor for the
/// destination, and whatever must outlive the migration (the userspace stack's cores).
type DemoLink = (Box<dyn Connector>, Box<dyn Acceptor + Send>, DemoCores);

/// The dataplane cores under the demo's link.
enum DemoCores {
    None,
    Loopback(LoopbackStack),
    /// The source's stack and the destination's, each on its own DPDK port.
    Dpdk(CoreStack, CoreStack),
}

impl DemoCores {
    /// The source's cores and the destination's, for their figures.
    fn meters(&self) -> Option<(StackMeter, StackMeter)> {
        match self {
            DemoCores::None => None,
            DemoCores::Loopback(stack) => Some(stack.meters()),
            DemoCores::Dpdk(source, destination) => Some((source.meter(), destination.meter())),
        }
    }
}

fn demo_link(args: &DemoArgs) -> Result<DemoLink> {
    let timeouts = timeouts(&args.common)?;
    match args.stack {
        DemoStack::Kernel => {
            let acceptor =
                TcpAcceptor::bind("127.0.0.1:0", timeouts).context("binding the demo's loopback listener")?;
            let connector = TcpConnector::new(acceptor.local_socket_addr()?, timeouts)?;
            Ok((Box::new(connector), Box::new(acceptor), DemoCores::None))
        }
        DemoStack::Dpdk => {
            const PORT: u16 = 4444;
            let (source_port, destination_port) =
                args.dpdk_ports.split_once(',').context("--dpdk-ports needs two port names, SOURCE,DESTINATION")?;
            let eal = demo_eal(args)?;
            let side = |port: &str, address: Ipv4Addr| {
                let config = core_config(port, address, 24, None, &args.dataplane, &args.wrappers, !args.common.no_pin);
                let cores = usize::from(args.dataplane.dataplane_cores);
                // The default memif pair joins two of our own stacks: segments go whole.
                let whole_segments = args.eal.is_empty() && !args.dataplane.no_offload;
                let request = PortRequest { name: port, cores, mtu: Some(args.mtu), xstats: false, whole_segments };
                super::dpdk::stack(&eal, &request, config)
            };
            let destination = side(destination_port, Ipv4Addr::new(10, 77, 0, 12))?;
            let source = side(source_port, Ipv4Addr::new(10, 77, 0, 11))?;
            let acceptor = destination.acceptor(PORT, timeouts)?;
            let connector = source.connector(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 12), PORT), timeouts);
            Ok((Box::new(connector), Box::new(acceptor), DemoCores::Dpdk(source, destination)))
        }
        DemoStack::Loopback => {
            const PORT: u16 = 4444;
            let stack = LoopbackStack::start_with(LoopbackOptions {
                mtu: usize::from(args.mtu),
                pin: !args.common.no_pin,
                wrappers: device_wrappers(&args.wrappers),
                ..loopback_options(&args.dataplane)
            })
            .context("starting the loopback dataplane")?;
            let acceptor = stack.acceptor(PORT, timeouts)?;
            let connector = stack.connector(PORT, timeouts);
            Ok((Box::new(connector), Box::new(acceptor), DemoCores::Loopback(stack)))
        }
    }
}

/// The demo's EAL arguments: those given after `--`, or by default (with `--stack dpdk`)
/// a memif pair joined inside the process; and the software compression device the codec
/// asks for, where the arguments lack it.
fn demo_eal(args: &DemoArgs) -> Result<Vec<String>> {
    let given = match (args.stack, args.eal.is_empty()) {
        (DemoStack::Dpdk, true) => super::dpdk::demo_eal_args(),
        _ => args.eal.clone(),
    };
    Ok(match super::compress::wanted(args.source.codec, args.source.compress_device.as_deref())? {
        Some(device) => super::compress::eal_args(&given, &device),
        None => given,
    })
}

fn demo(args: DemoArgs) -> Result<ExitCode> {
    let source_guest = SourceGuest::boot(&args.guest, &args.common)?;
    let backing = source_guest.backing();
    let (connector, acceptor, stack) = demo_link(&args)?;
    let meters = stack.meters();
    let (connector, mut acceptor) = super::tls::secure_demo_link(&args.tls, connector, acceptor)?;
    let mut vm = DestinationGuest::new(args.guest.guest, args.guest.mem, &args.common)?;
    // Both ends run here: each side's polling cores, and the rest shared by two pools.
    let cores_per_side = match args.stack {
        DemoStack::Kernel => 0,
        DemoStack::Loopback | DemoStack::Dpdk => usize::from(args.dataplane.dataplane_cores),
    };
    let cores = CoreShare::both_ends(cores_per_side, &args.dataplane);
    let offload =
        super::compress::source_device(args.source.codec, args.source.compress_device.as_deref(), &demo_eal(&args)?)?;
    let config = SourceConfig { offload, ..source_config(&args.source, &args.common, cores) };
    let dest_config = DestinationConfig {
        // Past the compression workers, which pin from the first CPU up.
        first_worker_cpu: config.compress_threads,
        ..destination_config(&args.destination, &args.common, cores, args.guest.mem, Duration::from_secs(10))
    };
    let run_after = args.run_after;
    let destination = std::thread::Builder::new().name("destination".into()).spawn(move || {
        let report = receive(&mut *acceptor, vm.vm(), &dest_config)?;
        let guest = vm.run_and_check(run_after)?;
        anyhow::Ok((report, guest))
    })?;
    let mut progress = report::ProgressView::new(args.common.json);
    let result = migrate(source_guest.vm(), &*connector, &config, &mut |p| progress.update(p));
    progress.finish();
    let destination = destination.join().map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    let mut stats = match result {
        Ok(stats) => stats,
        Err(err) => {
            // The source's error decides the exit status; the destination's goes along.
            let detail = destination.err().map(|e| format!(" (destination: {e:#})")).unwrap_or_default();
            return Err(anyhow::Error::new(err).context(format!("migration failed{detail}")));
        }
    };
    let (dest_report, mut dest_guest) = destination.context("destination failed")?;
    // The cores publish their figures a last time as they stop.
    drop(stack);
    let dataplane = meters.map(|(source, destination)| {
        serde_json::json!({"source": report::dataplane(&source), "destination": report::dataplane(&destination)})
    });
    if let Some(times) = source_guest.switchover_times() {
        // Both ends of the KVM guest's switchover in one place: the source's pause and
        // state save, the destination's VM build.
        dest_guest["switchover"]["pause-us"] = times.pause_us.into();
        dest_guest["switchover"]["state-save-us"] = times.state_save_us.into();
        dest_guest["switchover"]["state-bytes"] = times.state_bytes.into();
    }
    stats.guest_backing = backing;
    print_outcome(&stats, Some(&dest_report), Some(&dest_guest), dataplane, args.common.json)
}

fn print_outcome(
    stats: &migration::stats::MigrationStats,
    destination: Option<&DestinationReport>,
    guest: Option<&serde_json::Value>,
    dataplane: Option<serde_json::Value>,
    json: bool,
) -> Result<ExitCode> {
    if json {
        let mut value = serde_json::to_value(stats)?;
        if let Some(destination) = destination {
            value["destination"] = serde_json::to_value(destination)?;
        }
        if let Some(dataplane) = dataplane {
            value["dataplane"] = dataplane;
        }
        if let Some(guest) = guest {
            value["destination-guest"] = guest.clone();
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        report::print_tables(stats, destination, guest);
    }
    if stats.verified == Some(false) {
        return Err(Failure::err(Exit::Integrity, "verification failed: destination memory differs from the source's"));
    }
    Ok(ExitCode::SUCCESS)
}

fn send(args: SendArgs) -> Result<ExitCode> {
    let guest = SourceGuest::boot(&args.guest, &args.common)?;
    let (connector, _stack) = connector_for(&args.stack, !args.common.no_pin, &args.to, timeouts(&args.common)?)?;
    let cancel = Cancel::new();
    super::control::cancel_on_signals(&cancel)?;
    let status = super::control::Status::default();
    let tuning = engine::tuning::Tuning::new();
    let events = super::control::Events::default();
    let _control = match &args.control {
        Some(path) => Some(super::control::ControlSocket::start(
            path,
            cancel.clone(),
            tuning.clone(),
            status.clone(),
            events.clone(),
        )?),
        None => None,
    };
    let metrics = super::metrics::MetricsPage::default().with_stack(_stack.as_ref().map(CoreStack::meter));
    if let Some(address) = args.metrics.metrics {
        metrics.serve(address)?;
    }
    let cores = CoreShare::one_end(&args.stack);
    // Changed by the control socket, or by the destination's (a `Tune` from `recv`).
    let tuning = Some(tuning);
    let offload =
        super::compress::source_device(args.source.codec, args.source.compress_device.as_deref(), &args.stack.eal)?;
    let config =
        SourceConfig { cancel: Some(cancel), tuning, offload, ..source_config(&args.source, &args.common, cores) };
    let mut progress = report::ProgressView::new(args.common.json);
    let cpu = super::cpu::CpuWindow::start();
    let result = migrate(guest.vm(), &*connector, &config, &mut |p| {
        status.update(p);
        metrics.update(p);
        events.progress(p);
        progress.update(p)
    });
    progress.finish();
    events.emit("MIGRATION", serde_json::json!({ "status": super::control::ending(&result) }));
    match result {
        Ok(mut stats) => {
            stats.cpu_seconds = Some(cpu.seconds());
            stats.guest_backing = guest.backing();
            if let Some(t) = guest.switchover_times() {
                log::info!(
                    "KVM guest: vCPU paused in {} us, its state ({} bytes) saved in {} us",
                    t.pause_us,
                    t.state_bytes,
                    t.state_save_us
                );
            }
            print_outcome(&stats, None, None, None, args.common.json)
        }
        Err(err) => {
            // The engine resumed the guest; show that it really runs on.
            let before = guest.progress();
            std::thread::sleep(Duration::from_millis(200));
            let running = guest.progress() > before || guest.silent();
            let steps = guest.progress() - before;
            if running {
                log::info!("source guest keeps running ({steps} stores or ticks in the 200 ms after the failure)");
            } else {
                log::error!("source guest is NOT running ({steps} stores or ticks in the 200 ms after the failure)");
            }
            match err {
                engine::MigrationError::Cancelled(_) => Err(err.into()),
                _ => Err(anyhow::Error::new(err).context("migration failed")),
            }
        }
    }
}

fn recv(args: RecvArgs) -> Result<ExitCode> {
    let cores = CoreShare::one_end(&args.stack);
    let mut config = destination_config(
        &args.destination,
        &args.common,
        cores,
        args.max_mem,
        Duration::from_secs_f64(args.accept_timeout),
    );
    if let Some(device) = &args.compress_device {
        config.offload = Some(super::compress::open(device, &super::compress::eal_args(&args.stack.eal, device))?);
    }
    let (status, events) = (super::control::Status::default(), super::control::Events::default());
    let metrics = super::metrics::MetricsPage::default();
    let controls = engine::destination::DestinationControls::default();
    let _control = match &args.control {
        Some(path) => {
            let (cancel, tuning) = (controls.cancel.clone(), controls.tuning.clone());
            Some(super::control::ControlSocket::start(path, cancel, tuning, status.clone(), events.clone())?)
        }
        None => None,
    };
    if _control.is_some() || args.metrics.metrics.is_some() {
        let (status, events, metrics) = (status.clone(), events.clone(), metrics.clone());
        let progress = move |p: &engine::destination::DestinationProgress| {
            status.update_incoming(p);
            metrics.update_incoming(p);
            events.pass(p.rounds + 1);
        };
        config.controls = Some(engine::destination::DestinationControls {
            progress: Some(std::sync::Arc::new(progress)),
            ..controls
        });
    }
    // Before listening: a destination that cannot host the guest refuses before any source
    // pauses for it.
    let mut vm = DestinationGuest::new(args.guest, config.max_memory_bytes, &args.common)?;
    let (mut acceptor, _stack) = acceptor_for(&args.stack, !args.common.no_pin, args.listen, timeouts(&args.common)?)?;
    if let Some(address) = args.metrics.metrics {
        metrics.with_stack(_stack.as_ref().map(CoreStack::meter)).serve(address)?;
    }
    // Always on stderr, whatever the verbosity (JSON goes to stdout): with --listen ADDR:0
    // this is how a caller learns the port.
    eprintln!("vmigrate: waiting for a migration on {}", acceptor.local_addr());
    let cpu = super::cpu::CpuWindow::start();
    let received = receive(&mut *acceptor, vm.vm(), &config);
    events.emit("MIGRATION", serde_json::json!({ "status": super::control::ending(&received) }));
    let mut report = received.context("receiving the migration")?;
    report.cpu_seconds = Some(cpu.seconds());
    let guest = vm.run_and_check(args.run_after)?;
    if args.common.json {
        let mut value = serde_json::to_value(&report)?;
        value["destination-guest"] = guest;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        report::print_destination(&report, &guest);
    }
    if report.verified == Some(false) {
        return Err(Failure::err(Exit::Integrity, "verification failed: received memory differs from the source's"));
    }
    Ok(ExitCode::SUCCESS)
}

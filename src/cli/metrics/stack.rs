//! The dataplane cores' figures (`--stack tap|af-packet|dpdk`), read at each scrape from
//! what the cores publish every 100 ms: each core's busy time, each connection's smoothed
//! RTT, retransmissions and queues, as `ss -ti` would show a kernel connection's.

use super::{family, label};
use dataplane::stats::CoreSnapshot;

pub(super) fn render(out: &mut String, cores: &[CoreSnapshot]) {
    let per_core = |value: &dyn Fn(&CoreSnapshot) -> f64| -> Vec<(String, f64)> {
        cores.iter().map(|core| (format!("core=\"{}\"", label(&core.name)), value(core))).collect()
    };
    let busy = per_core(&|core| core.busy.as_secs_f64());
    let running = per_core(&|core| core.running.as_secs_f64());
    let retransmissions = per_core(&|core| core.retransmissions as f64);
    family(
        out,
        "dataplane_core_busy_seconds_total",
        "counter",
        "Time the core spent in loop iterations that moved frames or bytes.",
        &borrowed(&busy),
    );
    family(out, "dataplane_core_running_seconds_total", "counter", "Time since the core started.", &borrowed(&running));
    family(
        out,
        "dataplane_core_retransmissions_total",
        "counter",
        "TCP retransmissions on the core's connections, closed ones included.",
        &borrowed(&retransmissions),
    );
    let connection = |core: &CoreSnapshot, c: &dataplane::stats::ConnectionStats| {
        format!("core=\"{}\",local=\"{}\",remote=\"{}\"", label(&core.name), label(&c.local), label(&c.remote))
    };
    let (mut rtts, mut retransmits, mut send_queues, mut receive_queues) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for core in cores {
        for c in &core.connections {
            let labels = connection(core, c);
            if let Some(rtt) = c.smoothed_rtt {
                rtts.push((labels.clone(), rtt.as_secs_f64()));
            }
            retransmits.push((labels.clone(), c.retransmissions as f64));
            send_queues.push((labels.clone(), c.send_queue as f64));
            receive_queues.push((labels, c.recv_queue as f64));
        }
    }
    family(
        out,
        "connection_smoothed_rtt_seconds",
        "gauge",
        "The stack's smoothed round-trip time of an open connection (whole milliseconds).",
        &borrowed(&rtts),
    );
    family(
        out,
        "connection_retransmissions_total",
        "counter",
        "TCP retransmissions on an open connection.",
        &borrowed(&retransmits),
    );
    family(
        out,
        "connection_send_queue_bytes",
        "gauge",
        "Bytes in an open connection's send buffer: sent and not acknowledged, or not sent yet (ss's Send-Q).",
        &borrowed(&send_queues),
    );
    family(
        out,
        "connection_receive_queue_bytes",
        "gauge",
        "Bytes in an open connection's receive buffer that the application has not taken (ss's Recv-Q).",
        &borrowed(&receive_queues),
    );
}

fn borrowed(samples: &[(String, f64)]) -> Vec<(&str, f64)> {
    samples.iter().map(|(labels, value)| (labels.as_str(), *value)).collect()
}

//! Steering between the cores of one DPDK port: the device spreads flows over its queues
//! by a hash of its own (RSS, or the kernel's fanout hash under net_af_packet), so each
//! queue hands the frames of flows another core owns to that core's inbox, as mbufs: no
//! copy.

use crate::fanout::{owner, Steering};
use crossbeam_queue::ArrayQueue;
use dpdk::Mbuf;
use std::sync::Arc;

/// The queues' inboxes on one port: where a core puts the frames of flows another core
/// owns (the device spread flows by a hash of its own), as mbufs: no copy.
pub struct Inboxes {
    queues: Vec<ArrayQueue<Mbuf<'static>>>,
}

/// Frames one core's inbox holds; a full inbox drops, as a full NIC queue would.
const INBOX_FRAMES: usize = 4096;

impl Inboxes {
    pub fn new(cores: usize) -> Arc<Inboxes> {
        Arc::new(Inboxes { queues: (0..cores.max(1)).map(|_| ArrayQueue::new(INBOX_FRAMES)).collect() })
    }
}

/// A core's place among the queues of its port, and where the others' frames go.
pub(crate) struct Steer {
    pub at: Steering,
    pub inboxes: Arc<Inboxes>,
    /// Frames received from the device, and those of them handed to their owner.
    pub received: u64,
    pub moved: u64,
}

impl Steer {
    /// Takes out of `burst[from..]` the frames of flows other cores own and puts them in
    /// their inboxes (frames that are not TCP stay: the `SharedLink` above passes them on
    /// to all).
    pub fn hand_over(&mut self, burst: &mut Vec<Mbuf<'static>>, from: usize) {
        self.received += (burst.len() - from) as u64;
        let (core, cores) = (self.at.core, self.at.cores);
        let mut index = from;
        while index < burst.len() {
            match owner(burst[index].data(), cores) {
                Some(other) if other != core => {
                    let frame = burst.remove(index);
                    self.moved += 1;
                    // A full inbox drops the frame (TCP resends it).
                    let _ = self.inboxes.queues[other].push(frame);
                }
                _ => index += 1,
            }
        }
    }

    /// Frames other cores handed over, up to `max` in `burst`.
    pub fn take_inbox(&self, burst: &mut Vec<Mbuf<'static>>, max: usize) {
        let inbox = &self.inboxes.queues[self.at.core];
        while burst.len() < max {
            match inbox.pop() {
                Some(frame) => burst.push(frame),
                None => break,
            }
        }
    }
}

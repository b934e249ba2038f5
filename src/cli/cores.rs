//! How many workers a pool gets: the machine's CPUs, less the polling cores this process
//! runs, shared among its pools.

use super::args::{DataplaneOptions, IdleArg, NetStack, StackOptions};

/// The pools' sizing: polling cores this process runs, and pools sharing the rest.
#[derive(Clone, Copy)]
pub(super) struct CoreShare {
    pub polling_cores: usize,
    /// The polling cores give their CPU to a waiting thread whenever they find nothing to
    /// do (`--idle nap`, the default) rather than spin on it.
    pub cores_yield: bool,
    pub pools: usize,
}

impl CoreShare {
    /// One end on `stack`: its polling cores, unless it is the kernel's TCP.
    pub(super) fn one_end(stack: &StackOptions) -> Self {
        let polling_cores =
            if stack.stack == NetStack::Kernel { 0 } else { usize::from(stack.dataplane.dataplane_cores) };
        CoreShare { polling_cores, cores_yield: yields(&stack.dataplane), pools: 1 }
    }

    /// Both ends in one process, each with `cores_per_side` polling cores.
    pub(super) fn both_ends(cores_per_side: usize, dataplane: &DataplaneOptions) -> Self {
        CoreShare { polling_cores: 2 * cores_per_side, cores_yield: yields(dataplane), pools: 2 }
    }

    /// Workers for a pool that computes (compression): as asked, or the CPUs the polling
    /// cores leave.
    pub(super) fn workers(self, asked: Option<usize>) -> usize {
        asked.unwrap_or_else(|| transport::pin::default_workers(self.polling_cores, self.pools)).max(1)
    }

    /// Workers for the destination's pool: as asked, or sized as [`Self::workers`] but
    /// counting the CPUs of polling cores that yield. Those workers write every page of the
    /// guest for the first time, so much of their time goes to the kernel faulting memory in
    /// rather than to their own work, and a core that yields hands them its CPU whenever it
    /// has nothing to receive: on two CPUs, one worker beside the core held a whole
    /// migration over memif to 0.78x of the kernel's TCP, two took it to 0.94x
    /// (docs/PERFORMANCE.md). Spinning cores keep their CPUs.
    pub(super) fn destination_workers(self, asked: Option<usize>) -> usize {
        let held = if self.cores_yield { 0 } else { self.polling_cores };
        asked.unwrap_or_else(|| transport::pin::default_workers(held, self.pools)).max(1)
    }
}

fn yields(dataplane: &DataplaneOptions) -> bool {
    dataplane.idle == IdleArg::Nap
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::pin::default_workers;

    fn share(cores_yield: bool) -> CoreShare {
        CoreShare { polling_cores: 1, cores_yield, pools: 1 }
    }

    #[test]
    fn the_destination_counts_the_cpus_of_cores_that_yield() {
        assert_eq!(share(true).destination_workers(None), default_workers(0, 1));
        // Compression keeps to the CPUs the cores leave, as the destination does beside
        // spinning cores.
        assert_eq!(share(true).workers(None), default_workers(1, 1));
        assert_eq!(share(false).destination_workers(None), default_workers(1, 1));
    }

    #[test]
    fn a_pool_asked_for_gets_that_many() {
        assert_eq!(share(true).destination_workers(Some(3)), 3);
        assert_eq!(share(false).workers(Some(5)), 5);
        assert_eq!(share(true).destination_workers(Some(0)), 1);
    }
}

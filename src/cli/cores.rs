//! How many workers a pool gets: the machine's CPUs, less the polling cores this process
//! runs, shared among its pools.

use super::args::{NetStack, StackOptions};

/// The pools' sizing: polling cores this process runs, and pools sharing the rest.
#[derive(Clone, Copy)]
pub(super) struct CoreShare {
    pub polling_cores: usize,
    pub pools: usize,
}

impl CoreShare {
    /// One end on `stack`: its polling cores, unless it is the kernel's TCP.
    pub(super) fn one_end(stack: &StackOptions) -> Self {
        let polling_cores =
            if stack.stack == NetStack::Kernel { 0 } else { usize::from(stack.dataplane.dataplane_cores) };
        CoreShare { polling_cores, pools: 1 }
    }

    /// Workers for a pool: as asked, or sized from the machine's cores.
    pub(super) fn workers(self, asked: Option<usize>) -> usize {
        asked.unwrap_or_else(|| transport::pin::default_workers(self.polling_cores, self.pools)).max(1)
    }
}

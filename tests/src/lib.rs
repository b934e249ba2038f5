//! The end-to-end test harness of vmigrate: what the tests under `tests/e2e` use to run
//! migrations in process, start `vmigrate` processes with a deadline, put a faulty
//! network between them, and forge streams byte by byte. Everything here talks only to
//! loopback addresses.

pub mod control;
pub mod corpus;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod qemu;
pub mod reliability;
pub mod session;
pub mod strangers;
pub mod stream;
pub mod tls;

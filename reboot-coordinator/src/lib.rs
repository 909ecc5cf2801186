//! reboot-coordinator: limits how many hosts of a group reboot at once.
//!
//! - [`semaphore`]: the slot arithmetic (pure) and the read-decide-write loop over a [`semaphore::SlotStore`].
//! - [`etcd_store`]: the store on etcd v3 (leases for expiry, guarded transactions, activity log).
//! - [`server`]: the FleetLock HTTP server; [`metrics`]: its Prometheus counters.
//! - [`window`]: per-group reboot windows.
//! - [`cli`]: one function per subcommand of the binary.
//! - [`testing`]: real etcd members for tests.

pub mod cli;
pub mod etcd_store;
pub mod metrics;
pub mod semaphore;
pub mod server;
pub mod testing;
pub mod window;

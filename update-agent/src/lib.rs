//! update-agent: the host daemon of twinroot. Verified A/B installs into the inactive slot,
//! post-boot checks with automatic revert, reboot strategies (immediate, FleetLock-coordinated,
//! off) with maintenance windows, an Omaha client and a D-Bus API.
//!
//! The core ([`agent::Agent`], [`machine::Machine`], [`apply`]) is plain synchronous code behind
//! small traits ([`slots::SlotTable`], [`apply::BundleSource`], [`state::StateStore`],
//! [`net::OmahaTransport`], [`net::RebootLock`], [`reboot::Rebooter`], [`reboot::Clock`],
//! [`agent::HealthChecks`]) so the same agent drives a real disk and thousands of simulated hosts.

pub mod agent;
pub mod apply;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod error;
pub mod health;
pub mod host;
pub mod machine;
pub mod net;
pub mod reboot;
pub mod sim;
pub mod simulate;
pub mod slots;
pub mod state;

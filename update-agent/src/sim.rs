//! Pieces for running the agent core against simulated hosts (tests, the fleet simulator):
//! a rebooter that records requests, a settable clock, and the boot selector applied to any
//! [`SlotTable`] — the same `twinroot_format::slot` rule the real boot selector uses.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use jiff::Timestamp;
use twinroot_format::slot::{SlotName, after_boot_attempt, choose_boot};

use crate::error::AgentResult;
use crate::reboot::{Clock, Rebooter};
use crate::slots::SlotTable;

/// Counts reboot requests instead of rebooting; the harness then "boots" with [`boot`].
#[derive(Debug, Clone, Default)]
pub struct RecordingRebooter {
    pub requests: Arc<AtomicU32>,
}

impl Rebooter for RecordingRebooter {
    fn reboot(&mut self) -> AgentResult<()> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A clock the harness sets (Unix seconds).
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    pub unix_seconds: Arc<AtomicI64>,
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(self.unix_seconds.load(Ordering::SeqCst)).unwrap_or_default()
    }
}

/// What the boot selector does at power-on: picks a slot and consumes one try of it when it is
/// not yet successful. `None`: no bootable slot (the host would halt).
pub fn boot(table: &mut dyn SlotTable) -> AgentResult<Option<SlotName>> {
    let slots = table.slots()?;
    let Some(choice) = choose_boot(&slots) else {
        return Ok(None);
    };
    if choice.consume_try {
        let attrs = slots[choice.slot.index()].attrs;
        table.set_attrs(&[(choice.slot, after_boot_attempt(attrs))])?;
    }
    Ok(Some(choice.slot))
}

/// A bundle held in memory, shared between many simulated hosts.
#[derive(Debug, Clone)]
pub struct MemorySource {
    pub name: String,
    pub bytes: Arc<Vec<u8>>,
}

impl crate::apply::BundleSource for MemorySource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn open_at(&mut self, offset: u64) -> AgentResult<Box<dyn std::io::Read + Send>> {
        let mut c = std::io::Cursor::new(SharedBytes(self.bytes.clone()));
        c.set_position(offset.min(self.bytes.len() as u64));
        Ok(Box::new(c))
    }

    fn retryable(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

//! The agent's state machine: an explicit enum, one method per transition. Each transition states
//! the states it may come from; any other origin is a [`BadTransition`] (a bug, never silently
//! accepted). Pure data, no I/O.

use std::fmt;

use crate::error::ErrorKind;

/// What the agent is doing right now (shown over D-Bus and in `update-agent status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Nothing to do; waiting for the next check.
    Idle,
    CheckingForUpdate,
    /// The server offered `version`; policy checks pending.
    UpdateAvailable {
        version: String,
    },
    Downloading {
        version: String,
        /// Image bytes written so far and expected in total.
        done: u64,
        total: u64,
    },
    /// Reading the written slot back and checking its digest.
    Verifying {
        version: String,
    },
    /// Marking the slot bootable.
    Finalizing {
        version: String,
    },
    /// Staged; waiting for the reboot strategy (window, lock or operator).
    UpdatedNeedReboot {
        version: String,
    },
    Rebooting {
        version: String,
    },
    /// First boot of a new slot: running the post-boot checks.
    CheckingBoot {
        version: String,
    },
    /// The new boot failed its checks; going back to the previous slot.
    RollingBack {
        version: String,
    },
    /// The last operation failed; reported, then back to idle.
    ReportingError {
        kind: ErrorKind,
        message: String,
    },
}

impl Operation {
    /// Stable lowercase name, used over D-Bus.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Idle => "idle",
            Operation::CheckingForUpdate => "checking-for-update",
            Operation::UpdateAvailable { .. } => "update-available",
            Operation::Downloading { .. } => "downloading",
            Operation::Verifying { .. } => "verifying",
            Operation::Finalizing { .. } => "finalizing",
            Operation::UpdatedNeedReboot { .. } => "updated-need-reboot",
            Operation::Rebooting { .. } => "rebooting",
            Operation::CheckingBoot { .. } => "checking-boot",
            Operation::RollingBack { .. } => "rolling-back",
            Operation::ReportingError { .. } => "reporting-error",
        }
    }

    /// The version this operation is about, if any.
    pub fn version(&self) -> Option<&str> {
        match self {
            Operation::UpdateAvailable { version }
            | Operation::Downloading { version, .. }
            | Operation::Verifying { version }
            | Operation::Finalizing { version }
            | Operation::UpdatedNeedReboot { version }
            | Operation::Rebooting { version }
            | Operation::CheckingBoot { version }
            | Operation::RollingBack { version } => Some(version),
            _ => None,
        }
    }

    /// Progress 0.0..=1.0 while downloading; 1.0 once staged; 0.0 otherwise.
    pub fn progress(&self) -> f64 {
        match self {
            Operation::Downloading { done, total, .. } if *total > 0 => {
                (*done as f64 / *total as f64).min(1.0)
            }
            Operation::Verifying { .. }
            | Operation::Finalizing { .. }
            | Operation::UpdatedNeedReboot { .. }
            | Operation::Rebooting { .. } => 1.0,
            _ => 0.0,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(v) = self.version() {
            write!(f, " {v}")?;
        }
        if let Operation::ReportingError { kind, message } = self {
            write!(f, " {kind}: {message}")?;
        }
        Ok(())
    }
}

/// A transition asked from a state that does not allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {transition} while {from}")]
pub struct BadTransition {
    pub transition: &'static str,
    pub from: String,
}

/// The state machine. Holds only the current operation; everything durable is in
/// [`crate::state::PersistentState`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    op: Operation,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            op: Operation::Idle,
        }
    }
}

macro_rules! from {
    ($self:ident, $name:literal, $($pat:pat_param)|+) => {
        if !matches!($self.op, $($pat)|+) {
            return Err(BadTransition { transition: $name, from: $self.op.to_string() });
        }
    };
}

impl Machine {
    pub fn operation(&self) -> &Operation {
        &self.op
    }

    fn set(&mut self, op: Operation) -> Result<&Operation, BadTransition> {
        self.op = op;
        Ok(&self.op)
    }

    /// Idle | ReportingError | UpdatedNeedReboot -> CheckingForUpdate (a staged host keeps
    /// checking: a newer release replaces the staged one).
    pub fn start_check(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "start a check",
            Operation::Idle
                | Operation::ReportingError { .. }
                | Operation::UpdatedNeedReboot { .. }
        );
        self.set(Operation::CheckingForUpdate)
    }

    /// CheckingForUpdate -> Idle (no update offered).
    pub fn no_update(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "finish a check without update",
            Operation::CheckingForUpdate
        );
        self.set(Operation::Idle)
    }

    /// CheckingForUpdate | Idle (local install) -> UpdateAvailable.
    pub fn update_found(&mut self, version: &str) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "take an update",
            Operation::CheckingForUpdate | Operation::Idle | Operation::ReportingError { .. }
        );
        self.set(Operation::UpdateAvailable {
            version: version.to_string(),
        })
    }

    /// UpdateAvailable -> Downloading.
    pub fn start_download(&mut self, total: u64) -> Result<&Operation, BadTransition> {
        from!(self, "start downloading", Operation::UpdateAvailable { .. });
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::Downloading {
            version,
            done: 0,
            total,
        })
    }

    /// Downloading -> Downloading (progress).
    pub fn progress(&mut self, done_now: u64) -> Result<&Operation, BadTransition> {
        from!(self, "report progress", Operation::Downloading { .. });
        if let Operation::Downloading { done, .. } = &mut self.op {
            *done = done_now;
        }
        Ok(&self.op)
    }

    /// Downloading -> Verifying.
    pub fn downloaded(&mut self) -> Result<&Operation, BadTransition> {
        from!(self, "verify", Operation::Downloading { .. });
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::Verifying { version })
    }

    /// Verifying -> Finalizing.
    pub fn verified(&mut self) -> Result<&Operation, BadTransition> {
        from!(self, "finalize", Operation::Verifying { .. });
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::Finalizing { version })
    }

    /// Finalizing | Idle (found staged at start) -> UpdatedNeedReboot.
    pub fn staged(&mut self, version: &str) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "stage",
            Operation::Finalizing { .. } | Operation::Idle
        );
        self.set(Operation::UpdatedNeedReboot {
            version: version.to_string(),
        })
    }

    /// UpdatedNeedReboot | RollingBack -> Rebooting.
    pub fn reboot(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "reboot",
            Operation::UpdatedNeedReboot { .. } | Operation::RollingBack { .. }
        );
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::Rebooting { version })
    }

    /// Rebooting -> UpdatedNeedReboot (the reboot request failed or was refused).
    pub fn reboot_failed(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "return from a failed reboot",
            Operation::Rebooting { .. }
        );
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::UpdatedNeedReboot { version })
    }

    /// Idle -> CheckingBoot (first boot of a new slot).
    pub fn start_boot_check(&mut self, version: &str) -> Result<&Operation, BadTransition> {
        from!(self, "check the boot", Operation::Idle);
        self.set(Operation::CheckingBoot {
            version: version.to_string(),
        })
    }

    /// CheckingBoot -> Idle (healthy).
    pub fn boot_good(&mut self) -> Result<&Operation, BadTransition> {
        from!(self, "mark the boot good", Operation::CheckingBoot { .. });
        self.set(Operation::Idle)
    }

    /// CheckingBoot | UpdatedNeedReboot | Idle -> RollingBack.
    pub fn boot_bad(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "roll back",
            Operation::CheckingBoot { .. } | Operation::UpdatedNeedReboot { .. } | Operation::Idle
        );
        let version = self.op.version().unwrap_or_default().to_string();
        self.set(Operation::RollingBack { version })
    }

    /// Any state -> ReportingError.
    pub fn fail(&mut self, kind: ErrorKind, message: &str) -> &Operation {
        self.op = Operation::ReportingError {
            kind,
            message: message.to_string(),
        };
        &self.op
    }

    /// ReportingError | Idle -> Idle.
    pub fn reported(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "finish reporting",
            Operation::ReportingError { .. } | Operation::Idle
        );
        self.set(Operation::Idle)
    }

    /// UpdatedNeedReboot -> Idle (operator cancelled a staged update by rolling back).
    pub fn unstaged(&mut self) -> Result<&Operation, BadTransition> {
        from!(
            self,
            "unstage",
            Operation::UpdatedNeedReboot { .. } | Operation::Rebooting { .. }
        );
        self.set(Operation::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_transitions() {
        let mut m = Machine::default();
        m.start_check().unwrap();
        m.update_found("1.1.0").unwrap();
        m.start_download(100).unwrap();
        m.progress(50).unwrap();
        assert_eq!(m.operation().progress(), 0.5);
        m.downloaded().unwrap();
        m.verified().unwrap();
        m.staged("1.1.0").unwrap();
        assert_eq!(m.operation().name(), "updated-need-reboot");
        m.reboot().unwrap();
        assert_eq!(m.operation().version(), Some("1.1.0"));
    }

    #[test]
    fn transitions_from_wrong_states_are_refused() {
        let mut m = Machine::default();
        let e = m.downloaded().unwrap_err();
        assert_eq!(e.to_string(), "cannot verify while idle");
        m.start_check().unwrap();
        assert!(m.start_check().is_err());
        assert!(m.reboot().is_err());
        m.fail(ErrorKind::Network, "boom");
        m.reported().unwrap();
        m.start_boot_check("2.0.0").unwrap();
        m.boot_bad().unwrap();
        assert_eq!(m.operation().name(), "rolling-back");
        m.reboot().unwrap();
    }
}

//! The fixed set of failure kinds the agent reports, each with its Omaha error code.
//! The kinds are stable strings (metrics labels, D-Bus `LastError`); see docs/AGENT.md.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Anything that is not one of the kinds below.
    Internal,
    /// The update server or download URL could not be reached or answered badly.
    Network,
    /// The HTTP server answered with an error status (code 2000 + status).
    HttpStatus(u16),
    /// The bundle's signatures do not satisfy the keyring.
    Signature,
    /// The bundle is malformed (header, manifest, truncated or trailing data).
    Malformed,
    /// A digest or size did not match the signed manifest (download or read-back).
    DigestMismatch,
    /// The bundle is older than (or equal to) the running version and downgrades are not allowed.
    Downgrade,
    /// The image does not fit in the slot.
    TooLarge,
    /// The bundle is for another board.
    WrongBoard,
    /// The host rolled back from this version before.
    Quarantined,
    /// The running version is older than the bundle's minimum source version.
    SourceTooOld,
    /// Reading or writing the disk or its slot table failed.
    Disk,
    /// A required post-boot check failed.
    HealthCheck,
    /// The host is running the previous version again after trying the new one.
    Rollback,
    /// Taking or releasing the FleetLock reboot slot failed.
    RebootLock,
}

impl ErrorKind {
    /// The code sent as `errorcode` in an Omaha `eventresult="0"` event.
    pub fn omaha_code(self) -> u32 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Network => 9,
            ErrorKind::DigestMismatch => 10,
            ErrorKind::Signature => 12,
            ErrorKind::Malformed => 13,
            ErrorKind::Downgrade => 20,
            ErrorKind::TooLarge => 21,
            ErrorKind::WrongBoard => 22,
            ErrorKind::Quarantined => 23,
            ErrorKind::SourceTooOld => 24,
            ErrorKind::Disk => 30,
            ErrorKind::RebootLock => 31,
            ErrorKind::HealthCheck => 40,
            ErrorKind::Rollback => 44,
            ErrorKind::HttpStatus(s) => 2000 + u32::from(s),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::Network => "network",
            ErrorKind::HttpStatus(_) => "http-status",
            ErrorKind::Signature => "signature",
            ErrorKind::Malformed => "malformed",
            ErrorKind::DigestMismatch => "digest-mismatch",
            ErrorKind::Downgrade => "downgrade",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::WrongBoard => "wrong-board",
            ErrorKind::Quarantined => "quarantined",
            ErrorKind::SourceTooOld => "source-too-old",
            ErrorKind::Disk => "disk",
            ErrorKind::HealthCheck => "health-check",
            ErrorKind::Rollback => "rollback",
            ErrorKind::RebootLock => "reboot-lock",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::HttpStatus(s) => write!(f, "http-status-{s}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// An agent failure: a kind plus a message naming what it is about.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

//! The D-Bus API: `org.twinroot.Agent1` at `/org/twinroot/Agent1`, bus name `org.twinroot.Agent`.
//!
//! Methods: `GetStatus() -> (operation s, progress d, current_version s, new_version s,
//! last_check_unix t, last_error s)`, `GetQuarantined() -> as`, `Unquarantine(version s) -> s`,
//! `CheckNow() -> s`, `ApplyNow() -> s`, `Rollback() -> s`.
//! Signal: `StateChanged(operation s, new_version s, progress d)` on every state change.

use std::sync::{Arc, Mutex};

use zbus::object_server::SignalEmitter;
use zbus::{interface, proxy};

use crate::config::BusChoice;

pub const BUS_NAME: &str = "org.twinroot.Agent";
pub const OBJECT_PATH: &str = "/org/twinroot/Agent1";
pub const INTERFACE: &str = "org.twinroot.Agent1";

/// What `GetStatus` answers; kept up to date by the daemon's core thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub operation: String,
    pub progress: f64,
    pub current_version: String,
    pub new_version: String,
    pub last_check_unix: u64,
    pub last_error: String,
    /// Image bytes to write while downloading (for live progress).
    pub total_bytes: u64,
    /// Versions this host rolled back from and refuses until the server lifts them.
    pub quarantined: Vec<String>,
}

/// A request from the bus to the core thread, with where to send the answer.
pub enum Request {
    CheckNow(tokio::sync::oneshot::Sender<Result<String, String>>),
    ApplyNow(tokio::sync::oneshot::Sender<Result<String, String>>),
    Rollback(tokio::sync::oneshot::Sender<Result<String, String>>),
    Unquarantine(String, tokio::sync::oneshot::Sender<Result<String, String>>),
}

/// The served object.
pub struct AgentObject {
    pub status: Arc<Mutex<Status>>,
    /// Image bytes written by the running install.
    pub progress_bytes: Arc<std::sync::atomic::AtomicU64>,
    pub requests: std::sync::mpsc::Sender<Request>,
}

impl AgentObject {
    async fn ask(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<Result<String, String>>) -> Request,
    ) -> zbus::fdo::Result<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| zbus::fdo::Error::Failed("agent core has stopped".into()))?;
        match rx.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(zbus::fdo::Error::Failed(e)),
            Err(_) => Err(zbus::fdo::Error::Failed(
                "agent core dropped the request".into(),
            )),
        }
    }
}

#[interface(interface = "org.twinroot.Agent1")]
impl AgentObject {
    async fn get_status(&self) -> (String, f64, String, String, u64, String) {
        let s = self.status.lock().expect("status lock").clone();
        let progress = if s.operation == "downloading" && s.total_bytes > 0 {
            let done = self
                .progress_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            (done as f64 / s.total_bytes as f64).min(1.0)
        } else {
            s.progress
        };
        (
            s.operation,
            progress,
            s.current_version,
            s.new_version,
            s.last_check_unix,
            s.last_error,
        )
    }

    /// Versions this host rolled back from and will not install again until the update server
    /// lifts the quarantine.
    async fn get_quarantined(&self) -> Vec<String> {
        self.status.lock().expect("status lock").quarantined.clone()
    }

    /// Lets this host install a version it rolled back from again (one atomic state write);
    /// an error when the version is not quarantined.
    async fn unquarantine(&self, version: String) -> zbus::fdo::Result<String> {
        self.ask(move |reply| Request::Unquarantine(version, reply))
            .await
    }

    /// Checks for an update now and installs it if one is offered; returns the outcome.
    async fn check_now(&self) -> zbus::fdo::Result<String> {
        self.ask(Request::CheckNow).await
    }

    /// Checks, installs, and reboots now (ignoring the `off` strategy and maintenance windows,
    /// not the FleetLock).
    async fn apply_now(&self) -> zbus::fdo::Result<String> {
        self.ask(Request::ApplyNow).await
    }

    /// Cancels a staged update, or makes the previous slot the next boot.
    async fn rollback(&self) -> zbus::fdo::Result<String> {
        self.ask(Request::Rollback).await
    }

    #[zbus(signal)]
    pub async fn state_changed(
        emitter: &SignalEmitter<'_>,
        operation: &str,
        new_version: &str,
        progress: f64,
    ) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.twinroot.Agent1",
    default_service = "org.twinroot.Agent",
    default_path = "/org/twinroot/Agent1"
)]
pub trait Agent1 {
    fn get_status(&self) -> zbus::Result<(String, f64, String, String, u64, String)>;
    fn get_quarantined(&self) -> zbus::Result<Vec<String>>;
    fn unquarantine(&self, version: &str) -> zbus::Result<String>;
    fn check_now(&self) -> zbus::Result<String>;
    fn apply_now(&self) -> zbus::Result<String>;
    fn rollback(&self) -> zbus::Result<String>;
    #[zbus(signal)]
    fn state_changed(
        &self,
        operation: String,
        new_version: String,
        progress: f64,
    ) -> zbus::Result<()>;
}

/// Connects to the configured bus. `None` for `dbus.bus = "none"`.
pub async fn connect(
    bus: &BusChoice,
    method_timeout: Option<std::time::Duration>,
) -> zbus::Result<Option<zbus::Connection>> {
    let builder = match bus {
        BusChoice::None => return Ok(None),
        BusChoice::System => zbus::connection::Builder::system(),
        BusChoice::Session => zbus::connection::Builder::session(),
        BusChoice::Address(a) => zbus::connection::Builder::address(a.as_str()),
    };
    let builder = match method_timeout {
        Some(t) => builder.method_timeout(t),
        None => builder,
    };
    Ok(Some(builder.build().await?))
}

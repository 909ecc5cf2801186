//! The agent core: post-boot decisions, update checks, installs, reboots and rollbacks, as plain
//! synchronous code over the [`Host`] traits. The daemon drives it from blocking threads; the
//! fleet simulator drives it directly with in-memory implementations.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use twinroot_format::keyring::Keyring;
use twinroot_format::omaha::{self, event_result, event_type};
use twinroot_format::slot::{self, SlotAttrs, SlotName, SlotState};

use crate::apply::{BundleSource, Install, InstallPolicy, Installed};
use crate::config::{RebootStrategy, Settings};
use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::health::{CheckResult, HealthReport, Outcome, Requirement};
use crate::machine::{Machine, Operation};
use crate::net::{OmahaTransport, RebootLock};
use crate::reboot::{Clock, Rebooter, in_window, until_window};
use crate::slots::{BootedSlot, SlotTable};
use crate::state::{PendingEvent, PersistentState, StagedUpdate, StateStore};

/// Called with the new operation on every state change.
pub type Observer = Box<dyn FnMut(&Operation) + Send>;

/// Opens a bundle source for a URL (HTTP in the daemon, anything in the simulator).
pub trait SourceFactory: Send {
    fn open(&mut self, url: &str) -> AgentResult<Box<dyn BundleSource>>;
}

/// Runs the host-side post-boot checks (hooks, system state). The agent adds its own
/// "server reachable" check, as it owns the Omaha transport.
pub trait HealthChecks: Send {
    fn run(&mut self) -> HealthReport;
}

/// Everything the core touches outside itself.
pub struct Host {
    pub slots: Box<dyn SlotTable>,
    pub store: Box<dyn StateStore>,
    pub omaha: Option<Box<dyn OmahaTransport>>,
    pub sources: Box<dyn SourceFactory>,
    pub lock: Option<Box<dyn RebootLock>>,
    pub rebooter: Box<dyn Rebooter>,
    pub clock: Box<dyn Clock>,
    pub checks: Box<dyn HealthChecks>,
}

/// Who this host is, as sent to the update server.
#[derive(Debug, Clone)]
pub struct Identity {
    pub app_id: String,
    pub track: String,
    pub machine_id: String,
    pub boot_id: String,
    pub board: Option<String>,
}

/// The policy parts of the settings the core needs.
#[derive(Debug, Clone)]
pub struct AgentPolicy {
    pub install: InstallPolicy,
    pub strategy: RebootStrategy,
    pub windows: Vec<crate::config::MaintenanceWindow>,
    pub check_server_reachable: bool,
    /// How long after the first post-boot check an unreachable update server keeps the new boot
    /// pending (checks retried) instead of failing it: a server outage must not roll back a fleet.
    pub server_reachable_grace: Duration,
}

impl AgentPolicy {
    pub fn from_settings(s: &Settings, current_version: semver::Version) -> Self {
        AgentPolicy {
            install: InstallPolicy {
                current_version,
                allow_downgrade: s.agent.allow_downgrade,
                board: s.agent.board.clone(),
                tries: s.agent.tries,
                download_retries: s.server.download_retries,
                retry_base: Duration::from_millis(500),
                checkpoint_every: s.agent.checkpoint_bytes,
                readback_from_medium: s.agent.readback_from_medium,
            },
            strategy: s.reboot.strategy,
            windows: s.reboot.windows.clone(),
            check_server_reachable: s.checks.server_reachable && s.server.url.is_some(),
            server_reachable_grace: s.checks.server_reachable_grace,
        }
    }
}

/// Name of the built-in check that the update server answers.
pub const SERVER_REACHABLE: &str = "server-reachable";

/// What the post-boot step found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOutcome {
    /// Nothing new about this boot.
    Steady,
    /// The new slot passed its checks and was marked good.
    MarkedGood { version: String },
    /// The new slot failed its checks; marked bad, the host must reboot to the old slot.
    MarkedBad { version: String, reason: String },
    /// The host is back on the old slot after trying `version`.
    RolledBack { version: String },
    /// An update is staged and waits for its reboot.
    StillStaged { version: String },
    /// The new slot passed every check except that the update server is not reachable, and the
    /// grace period has not run out: nothing is marked; call `after_boot` again in `retry_in`.
    ChecksPending {
        version: String,
        reason: String,
        retry_in: Duration,
    },
}

/// What an update check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    NoUpdate,
    /// The offered version is already staged.
    AlreadyStaged {
        version: String,
    },
    Installed {
        version: String,
    },
    /// The offer was refused by local policy (quarantine and the like); not an error to retry.
    Refused {
        version: String,
        reason: String,
    },
}

/// What the reboot step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootDecision {
    Nothing,
    /// Strategy `off`: waiting for an operator.
    WaitForOperator,
    /// Outside the maintenance windows: wait this long.
    WaitForWindow(Duration),
    /// The FleetLock slot could not be taken (retry with backoff).
    LockBusy(String),
    Rebooted,
}

pub struct Agent {
    pub host: Host,
    pub booted: BootedSlot,
    pub identity: Identity,
    pub policy: AgentPolicy,
    pub keyring: Keyring,
    machine: Machine,
    /// Image bytes written by the running install.
    pub progress: Arc<AtomicU64>,
    /// The last post-boot report.
    pub last_report: Option<HealthReport>,
    /// When this boot's checks first found only the update server unreachable.
    unreachable_since: Option<jiff::Timestamp>,
    /// Called on every change of operation.
    pub observer: Option<Observer>,
}

fn state_err(e: crate::state::StateError) -> AgentError {
    AgentError::new(ErrorKind::Disk, e.to_string())
}

impl Agent {
    pub fn new(
        host: Host,
        booted: BootedSlot,
        identity: Identity,
        policy: AgentPolicy,
        keyring: Keyring,
    ) -> Self {
        Agent {
            host,
            booted,
            identity,
            policy,
            keyring,
            machine: Machine::default(),
            progress: Arc::new(AtomicU64::new(0)),
            last_report: None,
            unreachable_since: None,
            observer: None,
        }
    }

    pub fn operation(&self) -> &Operation {
        self.machine.operation()
    }

    /// Tells the observer (D-Bus signal, status snapshot) about the current operation.
    fn publish(&mut self) {
        if let Some(o) = self.observer.as_mut() {
            o(self.machine.operation());
        }
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn state(&mut self) -> AgentResult<PersistentState> {
        self.host.store.load().map_err(state_err)
    }

    fn save(&mut self, s: &PersistentState) -> AgentResult<()> {
        self.host.store.save(s).map_err(state_err)
    }

    fn current_version(&self) -> String {
        self.policy.install.current_version.to_string()
    }

    fn slots(&mut self) -> AgentResult<[SlotState; 2]> {
        self.host.slots.slots()
    }

    /// Queues an Omaha event and tries to deliver all queued events now.
    pub fn report(&mut self, event: PendingEvent) -> AgentResult<()> {
        let mut s = self.state()?;
        tracing::info!(event_type = event.event_type, result = event.result, code = ?event.error_code, detail = %event.detail, "reporting event");
        s.pending_events.push(event);
        self.save(&s)?;
        self.flush_events();
        Ok(())
    }

    /// Sends queued events in one event-only request; on failure they ride the next check.
    pub fn flush_events(&mut self) {
        let Ok(mut s) = self.state() else { return };
        if s.pending_events.is_empty() || self.host.omaha.is_none() {
            return;
        }
        let req = self.request(&s, false);
        let sent = s.pending_events.len();
        if let Some(t) = self.host.omaha.as_mut() {
            match t.exchange(&req) {
                Ok(_) => {
                    s.pending_events.drain(..sent);
                    let _ = self.save(&s);
                }
                Err(e) => tracing::warn!(error = %e, "cannot deliver events yet"),
            }
        }
    }

    /// Builds an Omaha request carrying the queued events.
    pub fn request(&self, s: &PersistentState, update_check: bool) -> omaha::Request {
        omaha::Request {
            protocol: omaha::PROTOCOL_VERSION.to_string(),
            version: Some(concat!("twinroot-update-agent-", env!("CARGO_PKG_VERSION")).into()),
            updater_version: Some(
                concat!("twinroot-update-agent-", env!("CARGO_PKG_VERSION")).into(),
            ),
            install_source: Some("scheduler".into()),
            is_machine: Some(true),
            os: Some(omaha::Os {
                version: Some("twinroot".into()),
                platform: Some("twinroot".into()),
                service_pack: Some(format!(
                    "{}_{}",
                    self.current_version(),
                    std::env::consts::ARCH
                )),
                arch: Some(std::env::consts::ARCH.into()),
            }),
            apps: vec![omaha::AppRequest {
                app_id: self.identity.app_id.clone(),
                version: Some(self.current_version()),
                track: Some(self.identity.track.clone()),
                machine_id: Some(self.identity.machine_id.clone()),
                boot_id: Some(self.identity.boot_id.clone()),
                board: self.identity.board.clone(),
                ping: update_check.then(|| omaha::Ping {
                    active: Some(true),
                    ..Default::default()
                }),
                update_check: update_check.then(omaha::UpdateCheck::default),
                events: s
                    .pending_events
                    .iter()
                    .map(|e| omaha::Event {
                        event_type: e.event_type,
                        event_result: e.result,
                        error_code: e.error_code.map(i64::from),
                        previous_version: e.previous_version.clone(),
                    })
                    .collect(),
                ..Default::default()
            }],
        }
    }

    // ------------------------------------------------------------------------------------------
    // After boot

    /// Decides what this boot means: rollback detected, new slot to check, staged update waiting.
    /// Runs the checks when the booted slot is new and marks it good or bad.
    pub fn after_boot(&mut self) -> AgentResult<BootOutcome> {
        let mut s = self.state()?;
        let slots = self.slots()?;
        let booted = self.booted.name();
        let booted_attrs = slots[booted.index()].attrs;

        if let Some(staged) = s.staged.clone()
            && staged.slot != booted.to_string()
        {
            if staged.reboot_requested {
                return self.rolled_back(s, staged);
            }
            let _ = self.machine.staged(&staged.version);
            self.publish();
            return Ok(BootOutcome::StillStaged {
                version: staged.version,
            });
        }

        if let Some(staged) = s.staged.clone()
            && staged.slot == booted.to_string()
            && staged.reboot_requested
            && booted_attrs.priority == 0
        {
            // This boot was already judged bad (the agent restarted before its reboot went
            // through): do not judge it again, go back.
            self.machine.boot_bad().ok();
            self.publish();
            return Ok(BootOutcome::MarkedBad {
                version: staged.version,
                reason: "marked bad earlier in this boot".into(),
            });
        }

        if booted_attrs.successful {
            // A steady boot: release a reboot slot we may still hold (released late after a
            // restart, or a failed release).
            self.release_lock(&mut s);
            return Ok(BootOutcome::Steady);
        }

        let version = self.current_version();
        let previous = s
            .staged
            .as_ref()
            .map(|st| st.previous_version.clone())
            .or_else(|| s.slot_versions.get(&booted.other().to_string()).cloned());
        self.machine.start_boot_check(&version).ok();
        self.publish();
        let report = self.run_checks();
        tracing::info!(version = %version, healthy = report.healthy(), "post-boot checks done\n{}", report.summary());
        self.last_report = Some(report.clone());

        if let Some(pending) = self.server_unreachable_grace(&report, &version) {
            return Ok(pending);
        }
        if report.healthy() {
            self.host
                .slots
                .set_attrs(&[(booted, slot::mark_good(booted_attrs))])?;
            s.staged = None;
            s.slot_versions.insert(booted.to_string(), version.clone());
            for w in report.warnings() {
                tracing::warn!(check = %w.name, "wanted check failed; boot still counts as good");
            }
            self.save(&s)?;
            self.machine.boot_good().ok();
            self.publish();
            // Give the reboot slot back first, so that once the server sees this host complete
            // the fleet can already move on (a failed release is retried later).
            let mut s = self.state()?;
            self.release_lock(&mut s);
            self.report(PendingEvent {
                event_type: event_type::UPDATE_COMPLETE,
                result: event_result::SUCCESS_REBOOT,
                error_code: None,
                previous_version: previous,
                detail: format!("booted {version} on slot {booted}, checks passed"),
            })?;
            return Ok(BootOutcome::MarkedGood { version });
        }

        let failure = report
            .first_failure()
            .cloned()
            .expect("unhealthy has a failure");
        let reason = describe_failure(&failure);
        let other = slots[booted.other().index()];
        if !(other.attrs.priority > 0 && (other.attrs.successful || other.attrs.tries > 0)) {
            // No slot to go back to: never leave the host unbootable. Keep this one.
            tracing::error!(version = %version, reason = %reason, "checks failed but slot {} cannot boot; keeping this slot", other.name);
            self.host
                .slots
                .set_attrs(&[(booted, slot::mark_good(booted_attrs))])?;
            self.machine.fail(ErrorKind::HealthCheck, &reason);
            self.publish();
            self.report_check_failure(previous, format!("{reason} (no fallback slot; kept)"))?;
            return Ok(BootOutcome::Steady);
        }
        // Mark bad, make the old slot the next boot, remember to report the rollback from there.
        let (back, _) = slot::staged(SlotAttrs::UNBOOTABLE, 1);
        let old = SlotAttrs {
            priority: back.priority.max(other.attrs.priority),
            ..other.attrs
        };
        self.host
            .slots
            .set_attrs(&[(booted, slot::mark_bad(booted_attrs)), (other.name, old)])?;
        s.quarantine(&version);
        s.staged = Some(StagedUpdate {
            version: version.clone(),
            slot: booted.to_string(),
            previous_version: previous.clone().unwrap_or_default(),
            reboot_requested: true,
        });
        self.save(&s)?;
        self.machine.boot_bad().ok();
        self.publish();
        self.report_check_failure(previous, reason.clone())?;
        Ok(BootOutcome::MarkedBad { version, reason })
    }

    /// Reports a failed post-boot check (event 3, error, the health-check code).
    fn report_check_failure(
        &mut self,
        previous: Option<String>,
        detail: String,
    ) -> AgentResult<()> {
        self.report(PendingEvent {
            event_type: event_type::UPDATE_COMPLETE,
            result: event_result::ERROR,
            error_code: Some(ErrorKind::HealthCheck.omaha_code()),
            previous_version: previous,
            detail,
        })
    }

    fn rolled_back(
        &mut self,
        mut s: PersistentState,
        staged: StagedUpdate,
    ) -> AgentResult<BootOutcome> {
        let failed_slot: SlotName = staged.slot.parse().unwrap_or(self.booted.inactive().name());
        // Whatever made us come back, the failed slot must not be tried again.
        self.host
            .slots
            .set_attrs(&[(failed_slot, SlotAttrs::UNBOOTABLE)])?;
        s.quarantine(&staged.version);
        s.staged = None;
        s.slot_versions.remove(&failed_slot.to_string());
        self.save(&s)?;
        tracing::warn!(version = %staged.version, slot = %failed_slot, "back on the previous slot: rolled back");
        self.report(PendingEvent {
            event_type: event_type::UPDATE_COMPLETE,
            result: event_result::ERROR,
            error_code: Some(ErrorKind::Rollback.omaha_code()),
            previous_version: Some(staged.version.clone()),
            detail: format!(
                "rolled back from {} to {}",
                staged.version,
                self.current_version()
            ),
        })?;
        let mut s = self.state()?;
        self.release_lock(&mut s);
        Ok(BootOutcome::RolledBack {
            version: staged.version,
        })
    }

    /// `ChecksPending` while the only required failure is the server-reachable check and the
    /// grace period (from the first such finding in this boot) has not run out.
    fn server_unreachable_grace(
        &mut self,
        report: &HealthReport,
        version: &str,
    ) -> Option<BootOutcome> {
        let failure = report.first_failure()?;
        let only_server = report
            .results
            .iter()
            .filter(|r| r.requirement == Requirement::Required && r.outcome != Outcome::Passed)
            .all(|r| r.name == SERVER_REACHABLE);
        if !only_server {
            return None;
        }
        let now = self.host.clock.now();
        let since = *self.unreachable_since.get_or_insert(now);
        let elapsed = now
            .duration_since(since)
            .unsigned_abs()
            .min(self.policy.server_reachable_grace);
        let left = self.policy.server_reachable_grace - elapsed;
        if left.is_zero() {
            return None;
        }
        let reason = describe_failure(failure);
        tracing::warn!(version = %version, reason = %reason, left_secs = left.as_secs(), "update server unreachable after boot; checks retried before the boot counts as failed");
        Some(BootOutcome::ChecksPending {
            version: version.to_string(),
            reason,
            retry_in: (self.policy.server_reachable_grace / 10)
                .clamp(Duration::from_secs(1), Duration::from_secs(30))
                .min(left),
        })
    }

    fn run_checks(&mut self) -> HealthReport {
        let mut report = HealthReport::default();
        if self.policy.check_server_reachable
            && let Some(t) = self.host.omaha.as_mut()
        {
            let started = std::time::Instant::now();
            let outcome = match t.probe() {
                Ok(()) => Outcome::Passed,
                Err(e) => Outcome::Failed(format!("update server not reachable: {e}")),
            };
            report.results.push(CheckResult {
                name: SERVER_REACHABLE.into(),
                requirement: Requirement::Required,
                outcome,
                stdout: String::new(),
                stderr: String::new(),
                duration: started.elapsed(),
            });
        }
        report.results.extend(self.host.checks.run().results);
        report
    }

    fn release_lock(&mut self, s: &mut PersistentState) {
        if !s.reboot_lock_held {
            return;
        }
        let Some(lock) = self.host.lock.as_mut() else {
            s.reboot_lock_held = false;
            let _ = self.save(s);
            return;
        };
        match lock.steady_state() {
            Ok(()) => {
                tracing::info!("reboot slot released (steady-state)");
                s.reboot_lock_held = false;
                let _ = self.save(s);
            }
            Err(e) => tracing::warn!(error = %e, "cannot release the reboot slot yet"),
        }
    }

    /// Retries releasing a held reboot slot (daemon tick).
    pub fn retry_release(&mut self) {
        if let Ok(mut s) = self.state()
            && s.reboot_lock_held
            && s.staged.is_none()
            && self
                .slots()
                .is_ok_and(|sl| sl[self.booted.name().index()].attrs.successful)
        {
            self.release_lock(&mut s);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Checking and installing

    /// Asks the update server for an update and installs it when one is offered.
    pub fn check(&mut self) -> AgentResult<CheckOutcome> {
        if self.machine.start_check().is_err() {
            return Err(AgentError::new(
                ErrorKind::Internal,
                format!("busy: {}", self.machine.operation()),
            ));
        }
        self.publish();
        let result = self.check_inner();
        match &result {
            Ok(CheckOutcome::Installed { .. }) => {}
            Ok(_) => {
                if matches!(self.machine.operation(), Operation::CheckingForUpdate) {
                    self.machine.no_update().ok();
                    self.publish();
                }
                self.machine.reported().ok();
                self.publish();
            }
            Err(e) => {
                self.machine.fail(e.kind, &e.message);
                self.publish();
                if let Ok(mut s) = self.state() {
                    s.last_error = Some(format!("{}: {}", e.kind, e.message));
                    let _ = self.save(&s);
                }
            }
        }
        // A staged update still waits for its reboot, whatever this check found.
        if !matches!(result, Ok(CheckOutcome::Installed { .. }))
            && let Ok(Some(staged)) = self.state().map(|s| s.staged)
            && staged.slot != self.booted.name().to_string()
        {
            self.machine.reported().ok();
            self.machine.staged(&staged.version).ok();
            self.publish();
        }
        result
    }

    fn check_inner(&mut self) -> AgentResult<CheckOutcome> {
        let mut s = self.state()?;
        let req = self.request(&s, true);
        let sent = s.pending_events.len();
        let Some(t) = self.host.omaha.as_mut() else {
            return Err(AgentError::new(
                ErrorKind::Internal,
                "no update server configured (server.url)",
            ));
        };
        let resp = t.exchange(&req)?;
        s.pending_events.drain(..sent);
        s.last_check_unix = Some(self.host.clock.now().as_second().max(0) as u64);
        s.last_error = None;
        self.save(&s)?;

        let app = resp
            .apps
            .iter()
            .find(|a| a.app_id.eq_ignore_ascii_case(&self.identity.app_id))
            .ok_or_else(|| {
                AgentError::new(
                    ErrorKind::Network,
                    format!(
                        "update server answered without app {}",
                        self.identity.app_id
                    ),
                )
            })?;
        if app.status != "ok" {
            return Err(AgentError::new(
                ErrorKind::Network,
                format!(
                    "update server refused app {}: status {:?}",
                    app.app_id, app.status
                ),
            ));
        }
        // Before the offer is looked at: an operator may have lifted the very version offered.
        self.lift_quarantine(&mut s, &app.lift_quarantine)?;
        let offer = match &app.update_check {
            None | Some(omaha::UpdateCheckResponse::NoUpdate) => return Ok(CheckOutcome::NoUpdate),
            Some(omaha::UpdateCheckResponse::Other(status)) => {
                return Err(AgentError::new(
                    ErrorKind::Network,
                    format!("update server answered updatecheck status {status:?}"),
                ));
            }
            Some(omaha::UpdateCheckResponse::Ok(o)) => o.clone(),
        };
        let url = offer.payload_url().ok_or_else(|| {
            AgentError::new(ErrorKind::Network, "update offer has no URL or package")
        })?;
        let version = offer.version.clone();
        if s.staged.as_ref().is_some_and(|st| st.version == version) {
            return Ok(CheckOutcome::AlreadyStaged { version });
        }
        if s.is_quarantined(&version) {
            tracing::info!(version = %version, "offered version is quarantined; ignoring");
            return Ok(CheckOutcome::Refused {
                reason: format!("version {version} is quarantined (this host rolled back from it)"),
                version,
            });
        }
        let mut source = self.host.sources.open(&url)?;
        match self.install_from(&mut *source, true) {
            Ok(i) => Ok(CheckOutcome::Installed {
                version: i.version.to_string(),
            }),
            Err(e) if matches!(e.kind, ErrorKind::Quarantined | ErrorKind::Downgrade) => {
                Ok(CheckOutcome::Refused {
                    version,
                    reason: e.message,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets the quarantine of the versions an operator lifted on the update server
    /// (`update-server instances lift-quarantine`), in one atomic state write, with a log line
    /// per version and a state-change signal. Versions not quarantined here are ignored (the
    /// server repeats a lift until the host reports the version).
    fn lift_quarantine(&mut self, s: &mut PersistentState, lifted: &[String]) -> AgentResult<()> {
        let lifted: Vec<String> = lifted
            .iter()
            .filter(|v| s.is_quarantined(v))
            .cloned()
            .collect();
        if lifted.is_empty() {
            return Ok(());
        }
        s.quarantined.retain(|q| !lifted.contains(q));
        self.save(s)?;
        for version in &lifted {
            tracing::info!(version = %version, "quarantine lifted by the update server: this version may be installed again");
        }
        self.publish();
        Ok(())
    }

    /// Forgets this host's quarantine of `version` at an operator's request on the host
    /// (`update-agent unquarantine`), in one atomic state write. Errors when the version is not
    /// quarantined.
    pub fn unquarantine(&mut self, version: &str) -> AgentResult<String> {
        let mut s = self.state()?;
        if !s.is_quarantined(version) {
            return Err(AgentError::new(
                ErrorKind::Internal,
                format!("version {version} is not quarantined on this host"),
            ));
        }
        s.quarantined.retain(|q| q != version);
        self.save(&s)?;
        tracing::info!(version = %version, "quarantine lifted on the host: this version may be installed again");
        self.publish();
        Ok(format!("version {version} may be installed again"))
    }

    /// Installs from a source (a URL from an offer, or a local bundle). Reports Omaha events when
    /// `report` is set.
    pub fn install_from(
        &mut self,
        source: &mut dyn BundleSource,
        report: bool,
    ) -> AgentResult<Installed> {
        let mut accepted: Option<String> = None;
        let progress = self.progress.clone();
        progress.store(0, std::sync::atomic::Ordering::Relaxed);
        let machine = &mut self.machine;
        let observer = &mut self.observer;
        let mut on_accepted = |m: &twinroot_format::manifest::Manifest| {
            let v = m.os_version.to_string();
            if machine.update_found(&v).is_ok() {
                let _ = machine.start_download(m.image.size);
            }
            if let Some(o) = observer.as_mut() {
                o(machine.operation());
            }
            accepted = Some(v);
        };
        let result = {
            let install = Install {
                slots: &mut *self.host.slots,
                booted: self.booted,
                store: &mut *self.host.store,
                source,
                keyring: &self.keyring,
                policy: &self.policy.install,
                progress: Some(&progress),
                on_accepted: Some(&mut on_accepted),
            };
            install.run()
        };
        let version = accepted.clone().unwrap_or_default();
        match result {
            Ok(i) => {
                let _ = self.machine.downloaded();
                let _ = self.machine.verified();
                let _ = self.machine.staged(&version);
                self.publish();
                self.publish();
                if report {
                    for (t, r) in [
                        (event_type::DOWNLOAD_STARTED, event_result::SUCCESS),
                        (event_type::DOWNLOAD_FINISHED, event_result::SUCCESS),
                        (event_type::UPDATE_COMPLETE, event_result::SUCCESS),
                    ] {
                        self.queue_event(PendingEvent {
                            event_type: t,
                            result: r,
                            error_code: None,
                            previous_version: Some(self.current_version()),
                            detail: format!("{version} staged in slot {}", i.slot),
                        })?;
                    }
                    self.flush_events();
                }
                Ok(i)
            }
            Err(e) => {
                tracing::error!(kind = %e.kind, error = %e.message, "install failed");
                // A checkpoint only helps a transient failure; anything else starts over.
                if !matches!(e.kind, ErrorKind::Network | ErrorKind::HttpStatus(_))
                    && let Ok(mut s) = self.state()
                {
                    s.download = None;
                    let _ = self.save(&s);
                }
                if report {
                    self.queue_event(PendingEvent {
                        event_type: event_type::UPDATE_COMPLETE,
                        result: event_result::ERROR,
                        error_code: Some(e.kind.omaha_code()),
                        previous_version: Some(self.current_version()),
                        detail: e.message.clone(),
                    })?;
                    self.flush_events();
                }
                Err(e)
            }
        }
    }

    fn queue_event(&mut self, e: PendingEvent) -> AgentResult<()> {
        let mut s = self.state()?;
        s.pending_events.push(e);
        self.save(&s)
    }

    // ------------------------------------------------------------------------------------------
    // Rebooting

    /// Reboots into a staged update when the strategy allows it now. `forced` (apply-now,
    /// rollback) ignores the `off` strategy and the maintenance windows, not the FleetLock.
    pub fn reboot_if_due(&mut self, forced: bool) -> AgentResult<RebootDecision> {
        let mut s = self.state()?;
        let Some(staged) = s.staged.clone() else {
            return Ok(RebootDecision::Nothing);
        };
        let back_to_old = staged.slot == self.booted.name().to_string();
        if !forced && !back_to_old {
            if self.policy.strategy == RebootStrategy::Off {
                return Ok(RebootDecision::WaitForOperator);
            }
            let now = self.host.clock.now();
            if !in_window(&self.policy.windows, now) {
                return Ok(RebootDecision::WaitForWindow(until_window(
                    &self.policy.windows,
                    now,
                )));
            }
        }
        if self.policy.strategy == RebootStrategy::Coordinated && !s.reboot_lock_held {
            let Some(lock) = self.host.lock.as_mut() else {
                return Err(AgentError::new(
                    ErrorKind::RebootLock,
                    "coordinated strategy without a FleetLock client",
                ));
            };
            if let Err(e) = lock.pre_reboot() {
                tracing::info!(error = %e, "reboot slot not granted yet");
                return Ok(RebootDecision::LockBusy(e.message));
            }
            s.reboot_lock_held = true;
        }
        if let Some(st) = s.staged.as_mut() {
            st.reboot_requested = true;
        }
        self.save(&s)?;
        let _ = self.machine.reboot();
        self.publish();
        tracing::info!(version = %staged.version, "rebooting");
        if let Err(e) = self.host.rebooter.reboot() {
            let _ = self.machine.reboot_failed();
            self.publish();
            return Err(e);
        }
        Ok(RebootDecision::Rebooted)
    }

    /// Operator rollback: cancels a staged update, or makes the other slot the next boot.
    pub fn rollback(&mut self) -> AgentResult<String> {
        let mut s = self.state()?;
        let booted = self.booted.name();
        let other = booted.other();
        if let Some(staged) = s.staged.clone()
            && staged.slot == other.to_string()
        {
            self.host
                .slots
                .set_attrs(&[(other, SlotAttrs::UNBOOTABLE)])?;
            s.staged = None;
            self.save(&s)?;
            let _ = self.machine.unstaged();
            self.publish();
            return Ok(format!(
                "cancelled staged update {} in slot {other}",
                staged.version
            ));
        }
        let slots = self.slots()?;
        let o = slots[other.index()].attrs;
        if !o.successful {
            return Err(AgentError::new(
                ErrorKind::Internal,
                format!("slot {other} never booted successfully; refusing to roll back to it"),
            ));
        }
        let b = slots[booted.index()].attrs;
        let (new_other, new_booted) = slot::staged(b, 1);
        self.host.slots.set_attrs(&[
            (
                other,
                SlotAttrs {
                    successful: true,
                    tries: 0,
                    ..new_other
                },
            ),
            (booted, new_booted),
        ])?;
        let version = s
            .slot_versions
            .get(&other.to_string())
            .cloned()
            .unwrap_or_else(|| "previous".into());
        s.staged = Some(StagedUpdate {
            version: version.clone(),
            slot: other.to_string(),
            previous_version: self.current_version(),
            reboot_requested: false,
        });
        self.save(&s)?;
        let _ = self.machine.staged(&version);
        self.publish();
        Ok(format!("slot {other} ({version}) is the next boot"))
    }
}

fn describe_failure(r: &CheckResult) -> String {
    let why = match &r.outcome {
        Outcome::Failed(w) => w.clone(),
        Outcome::Passed => "passed".into(),
    };
    let mut s = format!("required check {} failed: {why}", r.name);
    if !r.stderr.trim().is_empty() {
        s.push_str(&format!("; stderr: {}", r.stderr.trim()));
    }
    s
}

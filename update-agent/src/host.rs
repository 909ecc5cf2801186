//! Wiring the core to the real host: disk, state directory, HTTP, logind, hooks, identity.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::runtime::Handle;
use twinroot_format::keyring::Keyring;

use crate::agent::{Agent, AgentPolicy, HealthChecks, Host, Identity, SourceFactory};
use crate::apply::{BundleSource, FileSource};
use crate::config::{self, RebootStrategy, Settings};
use crate::error::AgentResult;
use crate::health::{BuiltinCheck, HealthReport, run_checks};
use crate::net::{FleetLockClient, HttpOmaha, HttpSource, OmahaTransport, RebootLock};
use crate::reboot::{LogindRebooter, Rebooter, SystemClock};
use crate::slots::{BootedSlot, GptSlotTable};
use crate::state::{FileStateStore, PersistentState, StateStore};

/// Decides the running OS version: configured, else os-release, else what the state file
/// recorded for the booted slot.
pub fn current_version(
    settings: &Settings,
    state: &PersistentState,
    booted: BootedSlot,
) -> anyhow::Result<semver::Version> {
    if let Some(v) = &settings.agent.current_version {
        return Ok(v.clone());
    }
    if let Some(v) = config::version_from_os_release(&settings.agent.os_release) {
        return Ok(v);
    }
    if let Some(v) = state.slot_versions.get(&booted.name().to_string()) {
        return semver::Version::parse(v)
            .with_context(|| format!("state file records slot version {v:?}"));
    }
    Err(anyhow!(
        "cannot tell the running OS version: no VERSION_ID in {}, none recorded for slot {}; set agent.current_version or pass --current-version",
        settings.agent.os_release.display(),
        booted.name()
    ))
}

/// The machine id (from /etc/machine-id, else one generated once and kept in the state dir).
pub fn machine_id(settings: &Settings) -> String {
    if let Ok(id) = std::fs::read_to_string(&settings.agent.machine_id_path) {
        let id = id.trim();
        if !id.is_empty() {
            return id.to_string();
        }
    }
    let path = settings.agent.state_dir.join("machine-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return id.trim().to_string();
    }
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    let id = hex::encode(bytes);
    let _ = crate::state::write_atomic(&settings.agent.state_dir, "machine-id", id.as_bytes());
    id
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| format!("{{{}}}", s.trim()))
        .unwrap_or_default()
}

pub fn load_keyring(path: &Path) -> anyhow::Result<Keyring> {
    Keyring::load(path).with_context(|| format!("{}: cannot load keyring", path.display()))
}

/// Bundle sources: `http(s)://` URLs through reqwest, anything else as a local file.
pub struct RealSources {
    pub client: reqwest::Client,
    pub rt: Handle,
}

impl SourceFactory for RealSources {
    fn open(&mut self, url: &str) -> AgentResult<Box<dyn BundleSource>> {
        Ok(source_for(url, &self.client, &self.rt))
    }
}

pub fn source_for(url: &str, client: &reqwest::Client, rt: &Handle) -> Box<dyn BundleSource> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Box::new(HttpSource {
            client: client.clone(),
            rt: rt.clone(),
            url: url.to_string(),
        })
    } else {
        Box::new(FileSource {
            path: PathBuf::from(url.strip_prefix("file://").unwrap_or(url)),
        })
    }
}

/// Hooks under the check directory plus "system not degraded" when systemd runs.
pub struct HostChecks {
    pub dir: PathBuf,
    pub timeout: Duration,
    pub system_not_degraded: bool,
    pub rt: Handle,
}

impl HealthChecks for HostChecks {
    fn run(&mut self) -> HealthReport {
        let mut builtins = Vec::new();
        if self.system_not_degraded && Path::new("/run/systemd/system").exists() {
            let rt = self.rt.clone();
            builtins.push(BuiltinCheck {
                name: "system-not-degraded".into(),
                run: Box::new(move || systemd_state(&rt)),
            });
        }
        run_checks(builtins, &self.dir, self.timeout)
    }
}

/// Waits (bounded) for systemd to finish starting up and checks it is not degraded.
fn systemd_state(rt: &Handle) -> Result<(), String> {
    rt.block_on(async {
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| format!("system bus: {e}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let reply = conn
                .call_method(
                    Some("org.freedesktop.systemd1"),
                    "/org/freedesktop/systemd1",
                    Some("org.freedesktop.DBus.Properties"),
                    "Get",
                    &("org.freedesktop.systemd1.Manager", "SystemState"),
                )
                .await
                .map_err(|e| format!("systemd: {e}"))?;
            let v: zbus::OwnedVariant = reply.body().deserialize().map_err(|e| e.to_string())?;
            let state: String = String::try_from(v).map_err(|e| e.to_string())?;
            match state.as_str() {
                "running" => return Ok(()),
                "starting" | "initializing" if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                other => return Err(format!("systemd reports the system as {other:?}")),
            }
        }
    })
}

/// Options that override the configuration (command-line flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub disk: Option<PathBuf>,
    pub booted_slot: Option<twinroot_format::slot::SlotName>,
    pub keyring: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub current_version: Option<semver::Version>,
    pub allow_downgrade: bool,
    pub board: Option<String>,
    pub bus: Option<config::BusChoice>,
}

impl Overrides {
    pub fn apply(&self, s: &mut Settings) {
        if let Some(d) = &self.disk {
            s.agent.disk = d.clone();
        }
        if let Some(b) = self.booted_slot {
            s.agent.booted_slot = config::BootedSlotSource::Fixed(b);
        }
        if let Some(k) = &self.keyring {
            s.agent.keyring = k.clone();
        }
        if let Some(d) = &self.state_dir {
            s.agent.state_dir = d.clone();
        }
        if let Some(v) = &self.current_version {
            s.agent.current_version = Some(v.clone());
        }
        if self.allow_downgrade {
            s.agent.allow_downgrade = true;
        }
        if let Some(b) = &self.board {
            s.agent.board = Some(b.clone());
        }
        if let Some(b) = &self.bus {
            s.bus = b.clone();
        }
    }
}

/// Builds the agent for this host from validated settings.
pub fn build_agent(settings: &Settings, rt: &Handle) -> anyhow::Result<Agent> {
    let booted = BootedSlot::new(config::booted_slot(&settings.agent.booted_slot)?);
    let keyring = load_keyring(&settings.agent.keyring)?;
    let slots =
        GptSlotTable::open(&settings.agent.disk, booted).map_err(|e| anyhow!("{}", e.message))?;
    let mut store = FileStateStore::new(&settings.agent.state_dir);
    let state = store.load()?;
    let version = current_version(settings, &state, booted)?;
    let client =
        crate::net::http_client(settings.server.timeout).map_err(|e| anyhow!(e.message))?;
    let omaha: Option<Box<dyn OmahaTransport>> = settings.server.url.as_ref().map(|u| {
        Box::new(HttpOmaha {
            client: client.clone(),
            rt: rt.clone(),
            url: u.clone(),
        }) as Box<dyn OmahaTransport>
    });
    let machine_id = machine_id(settings);
    let lock: Option<Box<dyn RebootLock>> =
        match (&settings.reboot.fleetlock_url, settings.reboot.strategy) {
            (Some(url), RebootStrategy::Coordinated) => Some(Box::new(FleetLockClient {
                client: client.clone(),
                rt: rt.clone(),
                base_url: url.clone(),
                id: machine_id.clone(),
                group: settings.reboot.group.clone(),
            })),
            _ => None,
        };
    let rebooter: Box<dyn Rebooter> = Box::new(LogindRebooter {
        rt: rt.clone(),
        method: settings.reboot.method,
    });
    let host = Host {
        slots: Box::new(slots),
        store: Box::new(store),
        omaha,
        sources: Box::new(RealSources {
            client,
            rt: rt.clone(),
        }),
        lock,
        rebooter,
        clock: Box::new(SystemClock),
        checks: Box::new(HostChecks {
            dir: settings.checks.dir.clone(),
            timeout: settings.checks.timeout,
            system_not_degraded: settings.checks.system_not_degraded,
            rt: rt.clone(),
        }),
    };
    let identity = Identity {
        app_id: settings.server.app_id.clone(),
        track: settings.server.track.clone(),
        machine_id,
        boot_id: boot_id(),
        board: settings.agent.board.clone(),
    };
    let policy = AgentPolicy::from_settings(settings, version);
    Ok(Agent::new(host, booted, identity, policy, keyring))
}

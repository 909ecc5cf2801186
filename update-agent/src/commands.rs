//! One function per subcommand of the `update-agent` binary.

use std::path::PathBuf;

use anyhow::{Context, anyhow};

use crate::config::{self, ConfigRoots, Settings};
use crate::host::{self, Overrides};

/// Where the configuration comes from, plus flag overrides.
#[derive(Debug, Clone, Default)]
pub struct Common {
    /// Replaces the default configuration roots when not empty.
    pub config_dirs: Vec<PathBuf>,
    /// Extra fragments applied last.
    pub config_files: Vec<PathBuf>,
    pub overrides: Overrides,
}

impl Common {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut roots = if self.config_dirs.is_empty() {
            ConfigRoots::from_env()
        } else {
            ConfigRoots {
                dirs: self.config_dirs.clone(),
                extra_files: Vec::new(),
            }
        };
        roots.extra_files.extend(self.config_files.iter().cloned());
        let mut s = config::load(&roots)?;
        self.overrides.apply(&mut s);
        Ok(s)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `update-agent install BUNDLE`: applies a local bundle (or a URL) to the inactive slot.
pub fn install(common: &Common, bundle: &str) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let rt = runtime()?;
    let mut agent = host::build_agent(&settings, rt.handle())?;
    let mut source = {
        let client =
            crate::net::http_client(settings.server.timeout).map_err(|e| anyhow!(e.message))?;
        host::source_for(bundle, &client, rt.handle())
    };
    let installed = agent
        .install_from(&mut *source, false)
        .map_err(|e| anyhow!("{e} [{}]", e.kind))?;
    println!(
        "installed {} into slot {} ({}){}",
        installed.version,
        installed.slot,
        installed.attrs,
        if installed.resumed_from > 0 {
            format!(", resumed at image byte {}", installed.resumed_from)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `update-agent daemon`: runs the agent until SIGTERM.
pub fn daemon(common: &Common) -> anyhow::Result<()> {
    let settings = common.settings()?;
    crate::daemon::run(settings)
}

/// Calls the daemon over D-Bus with a long method timeout (installs take minutes).
fn with_proxy<T>(
    common: &Common,
    f: impl AsyncFnOnce(crate::dbus::Agent1Proxy<'static>) -> zbus::Result<T>,
) -> anyhow::Result<T> {
    let settings = common.settings()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let conn = crate::dbus::connect(
            &settings.bus,
            Some(std::time::Duration::from_secs(6 * 3600)),
        )
        .await
        .with_context(|| format!("cannot connect to the D-Bus bus {:?}", settings.bus))?
        .ok_or_else(|| anyhow!("dbus.bus is \"none\": the daemon has no D-Bus API here"))?;
        let proxy = crate::dbus::Agent1Proxy::new(&conn)
            .await
            .context("cannot reach the agent on the bus")?;
        f(proxy)
            .await
            .map_err(|e| anyhow!("{}: {e}", crate::dbus::BUS_NAME))
    })
}

/// `update-agent status`.
pub fn status(common: &Common) -> anyhow::Result<()> {
    let settings = common.settings()?;
    if settings.bus == crate::config::BusChoice::None {
        return status_from_files(&settings);
    }
    let ((op, progress, current, new, last_check, last_error), quarantined) =
        with_proxy(common, async |p| {
            Ok((p.get_status().await?, p.get_quarantined().await?))
        })?;
    println!("operation: {op}");
    if progress > 0.0 {
        println!("progress: {:.1}%", progress * 100.0);
    }
    println!("current version: {current}");
    if !new.is_empty() {
        println!("new version: {new}");
    }
    if last_check > 0 {
        let t = jiff::Timestamp::from_second(last_check as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        println!("last check: {t}");
    }
    if !last_error.is_empty() {
        println!("last error: {last_error}");
    }
    if !quarantined.is_empty() {
        println!("quarantined: {}", quarantined.join(", "));
    }
    Ok(())
}

/// `Unquarantine` through the daemon's D-Bus API; `None` when there is no bus or no daemon on it.
fn unquarantine_by_daemon(settings: &Settings, version: &str) -> anyhow::Result<Option<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let Ok(Some(conn)) = crate::dbus::connect(&settings.bus, None).await else {
            return Ok(None);
        };
        let proxy = crate::dbus::Agent1Proxy::new(&conn)
            .await
            .context("cannot reach the agent on the bus")?;
        match proxy.unquarantine(version).await {
            Ok(answer) => Ok(Some(answer)),
            Err(zbus::Error::MethodError(name, _, _))
                if matches!(
                    name.as_str(),
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                        | "org.freedesktop.DBus.Error.NameHasNoOwner"
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(anyhow!("{}: {e}", crate::dbus::BUS_NAME)),
        }
    })
}

/// Status without a D-Bus API: what the state file and the slot table say.
fn status_from_files(settings: &Settings) -> anyhow::Result<()> {
    use crate::state::StateStore;
    let store = crate::state::FileStateStore::new(&settings.agent.state_dir);
    let state = { store.clone() }.load()?;
    println!(
        "(dbus.bus is \"none\": read from {} and {})",
        store.path().display(),
        settings.agent.disk.display()
    );
    match twinroot_format::gpt::SlotDisk::open(&settings.agent.disk) {
        Ok(disk) => {
            for s in disk.slots() {
                let version = state
                    .slot_versions
                    .get(&s.name.to_string())
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default();
                println!("slot {}: {}{version}", s.name, s.attrs);
            }
        }
        Err(e) => println!("slots: {e}"),
    }
    if let Some(st) = &state.staged {
        println!(
            "staged: {} in slot {}{}",
            st.version,
            st.slot,
            if st.reboot_requested {
                ", reboot requested"
            } else {
                ", waiting for the reboot"
            }
        );
    }
    if let Some(d) = &state.download {
        println!(
            "interrupted download: {} at image byte {} ({})",
            d.version, d.image_offset, d.url
        );
    }
    if !state.quarantined.is_empty() {
        println!("quarantined: {}", state.quarantined.join(", "));
    }
    if let Some(t) = state.last_check_unix {
        let t = jiff::Timestamp::from_second(t as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        println!("last check: {t}");
    }
    if let Some(e) = &state.last_error {
        println!("last error: {e}");
    }
    Ok(())
}

/// `update-agent check`.
pub fn check(common: &Common) -> anyhow::Result<()> {
    println!("{}", with_proxy(common, async |p| p.check_now().await)?);
    Ok(())
}

/// `update-agent apply-now`.
pub fn apply_now(common: &Common) -> anyhow::Result<()> {
    println!("{}", with_proxy(common, async |p| p.apply_now().await)?);
    Ok(())
}

/// `update-agent rollback`.
pub fn rollback(common: &Common) -> anyhow::Result<()> {
    println!("{}", with_proxy(common, async |p| p.rollback().await)?);
    Ok(())
}

/// `update-agent unquarantine VERSION`: lets a version this host rolled back from be installed
/// again (edits the state file; run while the daemon is stopped or idle).
pub fn unquarantine(common: &Common, version: &str) -> anyhow::Result<()> {
    use crate::state::StateStore;
    let settings = common.settings()?;
    // A running daemon owns the state file: ask it, so its own state writes cannot race with
    // this one. Without a bus or a daemon on it, edit the file here.
    if let Some(answer) = unquarantine_by_daemon(&settings, version)? {
        println!("{answer}");
        return Ok(());
    }
    let mut store = crate::state::FileStateStore::new(&settings.agent.state_dir);
    let mut state = store.load()?;
    let before = state.quarantined.len();
    state.quarantined.retain(|v| v != version);
    if state.quarantined.len() == before {
        return Err(anyhow!(
            "version {version} is not quarantined in {}",
            store.path().display()
        ));
    }
    store.save(&state)?;
    println!("version {version} may be installed again");
    Ok(())
}

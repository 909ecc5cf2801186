//! The daemon: the agent core on its own thread, driven by a poll schedule (jitter, exponential
//! backoff) and by requests from the D-Bus API; sd_notify readiness; runs with or without a bus.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc::UnboundedSender;

use crate::agent::{Agent, BootOutcome, CheckOutcome, RebootDecision};
use crate::config::{ServerSettings, Settings};
use crate::dbus::{self, AgentObject, Request, Status};
use crate::machine::Operation;

/// Delay before the next update check. `failures` counts consecutive failed checks; `first` is
/// the first check after start; `unit` is a uniform random number in [0, 1). Pure.
pub fn next_check_delay(s: &ServerSettings, first: bool, failures: u32, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    if first {
        let span = s.first_check_max.saturating_sub(s.first_check_min);
        return s.first_check_min + span.mul_f64(unit);
    }
    if failures == 0 {
        // interval +- jitter
        let jitter = s.jitter.min(s.interval);
        return (s.interval - jitter) + (jitter * 2).mul_f64(unit);
    }
    // Exponential backoff from the first-check minimum (2 min by default) up to max_backoff
    // (4 h), with +-10% jitter so a fleet does not retry in lockstep.
    let base = s.first_check_min.max(Duration::from_secs(1));
    let exp = base.saturating_mul(1u32 << (failures - 1).min(20));
    let capped = exp.min(s.max_backoff.max(Duration::from_secs(1)));
    capped.mul_f64(0.9 + 0.2 * unit)
}

/// Sends a message to systemd's notification socket, if there is one.
pub fn sd_notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
    } else {
        sock.send_to(message.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let handle = tokio::runtime::Handle::current();
    let agent = {
        let settings = settings.clone();
        let handle = handle.clone();
        tokio::task::spawn_blocking(move || crate::host::build_agent(&settings, &handle))
            .await
            .context("agent setup panicked")??
    };
    let mut agent = agent;
    let status = Arc::new(Mutex::new(Status {
        operation: "idle".into(),
        current_version: agent.policy.install.current_version.to_string(),
        quarantined: agent.state().map(|s| s.quarantined).unwrap_or_default(),
        ..Status::default()
    }));
    let progress_bytes = agent.progress.clone();
    let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<Status>();

    let conn = match dbus::connect(&settings.bus, None).await {
        Ok(c) => c,
        // Minimal images have no system bus: run without the API rather than not at all.
        Err(e) if settings.bus == crate::config::BusChoice::System => {
            tracing::warn!(error = %e, "no system bus; running without the D-Bus API (set dbus.bus = \"none\" to silence this)");
            None
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot connect to the D-Bus bus {:?}: {e} (set dbus.bus = \"none\" to run without one)",
                settings.bus
            ));
        }
    };
    if let Some(conn) = &conn {
        conn.object_server()
            .at(
                dbus::OBJECT_PATH,
                AgentObject {
                    status: status.clone(),
                    progress_bytes: progress_bytes.clone(),
                    requests: req_tx.clone(),
                },
            )
            .await?;
        conn.request_name(dbus::BUS_NAME)
            .await
            .with_context(|| format!("cannot own the bus name {}", dbus::BUS_NAME))?;
        tracing::info!(name = dbus::BUS_NAME, "D-Bus API ready");
    }

    let core_status = status.clone();
    let server = settings.server.clone();
    let core = std::thread::Builder::new()
        .name("agent-core".into())
        .spawn(move || core_loop(agent, server, req_rx, core_status, sig_tx))
        .context("cannot start the agent thread")?;

    sd_notify("READY=1\nSTATUS=running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            s = sig_rx.recv() => {
                let Some(s) = s else { break };
                sd_notify(&format!("STATUS={} {}", s.operation, s.new_version));
                if let Some(conn) = &conn
                    && let Ok(iface) = conn.object_server().interface::<_, AgentObject>(dbus::OBJECT_PATH).await
                {
                    let _ = AgentObject::state_changed(iface.signal_emitter(), &s.operation, &s.new_version, s.progress).await;
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    sd_notify("STOPPING=1");
    drop(req_tx);
    // The core thread may be in the middle of a download; its checkpoints make that safe, so the
    // process exits without waiting for it.
    if core.is_finished() {
        let _ = core.join();
    }
    Ok(())
}

fn publish(status: &Arc<Mutex<Status>>, agent: &mut Agent, sig: &UnboundedSender<Status>) {
    let snapshot = {
        let mut s = status.lock().expect("status lock");
        let op = agent.operation().clone();
        s.operation = op.name().to_string();
        s.new_version = op.version().unwrap_or_default().to_string();
        s.progress = op.progress();
        if let Ok(st) = agent.state() {
            s.last_check_unix = st.last_check_unix.unwrap_or(0);
            s.last_error = st.last_error.unwrap_or_default();
            s.quarantined = st.quarantined;
            if s.new_version.is_empty()
                && let Some(staged) = st.staged
            {
                s.new_version = staged.version;
            }
        }
        s.clone()
    };
    let _ = sig.send(snapshot);
}

fn describe(o: &CheckOutcome) -> String {
    match o {
        CheckOutcome::NoUpdate => "no update".into(),
        CheckOutcome::AlreadyStaged { version } => format!("{version} already staged"),
        CheckOutcome::Installed { version } => format!("installed {version}"),
        CheckOutcome::Refused { version, reason } => format!("refused {version}: {reason}"),
    }
}

fn core_loop(
    mut agent: Agent,
    server: ServerSettings,
    requests: Receiver<Request>,
    status: Arc<Mutex<Status>>,
    sig: UnboundedSender<Status>,
) {
    {
        let status = status.clone();
        let sig = sig.clone();
        let progress = agent.progress.clone();
        agent.observer = Some(Box::new(move |op: &Operation| {
            let snapshot = {
                let mut s = status.lock().expect("status lock");
                s.operation = op.name().to_string();
                if let Some(v) = op.version() {
                    s.new_version = v.to_string();
                }
                s.progress = match op {
                    Operation::Downloading { total, .. } if *total > 0 => {
                        progress.load(Ordering::Relaxed) as f64 / *total as f64
                    }
                    other => other.progress(),
                };
                if let Operation::Downloading { total, .. } = op {
                    s.total_bytes = *total;
                }
                s.clone()
            };
            let _ = sig.send(snapshot);
        }));
    }

    let mut outcome = agent.after_boot();
    // The update server is down: keep the new boot pending (unmarked) and check again, until it
    // answers or the grace period runs out (`checks.server_reachable_grace_secs`).
    while let Ok(BootOutcome::ChecksPending { retry_in, .. }) = &outcome {
        publish(&status, &mut agent, &sig);
        std::thread::sleep(*retry_in);
        outcome = agent.after_boot();
    }
    match outcome {
        Ok(BootOutcome::MarkedBad { version, reason }) => {
            tracing::error!(version = %version, reason = %reason, "new boot failed its checks; rolling back");
            if let Err(e) = agent.reboot_if_due(true) {
                tracing::error!(error = %e, "cannot reboot back to the previous slot");
            }
        }
        Ok(outcome) => tracing::info!(?outcome, "boot assessed"),
        Err(e) => tracing::error!(error = %e, kind = %e.kind, "post-boot step failed"),
    }
    publish(&status, &mut agent, &sig);

    let polling = agent.host.omaha.is_some();
    let mut failures = 0u32;
    let mut next_check = Instant::now() + next_check_delay(&server, true, 0, fastrand::f64());
    let mut next_reboot_try = Instant::now();
    let mut reboot_failures = 0u32;
    loop {
        let now = Instant::now();
        let mut wake = next_reboot_try.max(now + Duration::from_secs(1));
        if polling {
            wake = wake.min(next_check);
        }
        let timeout = wake
            .saturating_duration_since(now)
            .min(Duration::from_secs(3600));
        let mut forced_reboot = false;
        match requests.recv_timeout(timeout) {
            Ok(Request::CheckNow(reply)) => {
                let r = agent
                    .check()
                    .map(|o| describe(&o))
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    failures = 0;
                }
                // Something may be staged now: decide about the reboot right away.
                next_reboot_try = Instant::now();
                publish(&status, &mut agent, &sig);
                let _ = reply.send(r);
            }
            Ok(Request::ApplyNow(reply)) => {
                let staged = agent.state().ok().and_then(|s| s.staged).is_some();
                let r = if staged {
                    Ok("update already staged".to_string())
                } else {
                    agent
                        .check()
                        .map(|o| describe(&o))
                        .map_err(|e| e.to_string())
                };
                publish(&status, &mut agent, &sig);
                let _ = reply.send(r.map(|s| format!("{s}; rebooting if staged")));
                forced_reboot = true;
            }
            Ok(Request::Rollback(reply)) => {
                let r = agent.rollback().map_err(|e| e.to_string());
                publish(&status, &mut agent, &sig);
                let _ = reply.send(r);
            }
            Ok(Request::Unquarantine(version, reply)) => {
                let r = agent.unquarantine(&version).map_err(|e| e.to_string());
                publish(&status, &mut agent, &sig);
                let _ = reply.send(r);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if polling && now >= next_check {
            match agent.check() {
                Ok(o) => {
                    failures = 0;
                    tracing::info!(outcome = %describe(&o), "update check");
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, kind = %e.kind, failures, "update check failed");
                }
            }
            publish(&status, &mut agent, &sig);
            next_check =
                Instant::now() + next_check_delay(&server, false, failures, fastrand::f64());
            next_reboot_try = Instant::now();
        }
        if forced_reboot || Instant::now() >= next_reboot_try {
            agent.retry_release();
            match agent.reboot_if_due(forced_reboot) {
                Ok(RebootDecision::WaitForWindow(d)) => {
                    next_reboot_try = Instant::now() + d.max(Duration::from_secs(30));
                }
                Ok(RebootDecision::LockBusy(_)) => {
                    reboot_failures += 1;
                    next_reboot_try = Instant::now()
                        + next_check_delay(&server, false, reboot_failures, fastrand::f64())
                            .min(Duration::from_secs(600));
                }
                Ok(RebootDecision::Rebooted) => {
                    reboot_failures = 0;
                    next_reboot_try = Instant::now() + Duration::from_secs(300);
                }
                Ok(_) => {
                    reboot_failures = 0;
                    next_reboot_try = Instant::now() + Duration::from_secs(60);
                }
                Err(e) => {
                    tracing::error!(error = %e, "reboot failed");
                    next_reboot_try = Instant::now() + Duration::from_secs(60);
                }
            }
            publish(&status, &mut agent, &sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        crate::config::from_fragments(&[]).unwrap().server
    }

    #[test]
    fn poll_schedule() {
        let s = settings();
        // first check 2-12 min after start
        assert_eq!(next_check_delay(&s, true, 0, 0.0), Duration::from_secs(120));
        assert_eq!(next_check_delay(&s, true, 0, 0.5), Duration::from_secs(420));
        // about every 45 min +- 5 min
        assert_eq!(
            next_check_delay(&s, false, 0, 0.0),
            Duration::from_secs(2400)
        );
        assert_eq!(
            next_check_delay(&s, false, 0, 0.5),
            Duration::from_secs(2700)
        );
        // exponential backoff 2 min, 4 min, ... up to 4 h
        assert_eq!(
            next_check_delay(&s, false, 1, 0.5),
            Duration::from_secs(120)
        );
        assert_eq!(
            next_check_delay(&s, false, 2, 0.5),
            Duration::from_secs(240)
        );
        assert_eq!(
            next_check_delay(&s, false, 30, 0.5),
            Duration::from_secs(4 * 3600)
        );
        let lo = next_check_delay(&s, false, 30, 0.0);
        let hi = next_check_delay(&s, false, 30, 0.999);
        assert!(lo < hi && lo >= Duration::from_secs(12960));
        // Short test settings (the QEMU images poll every 2 s, back off to 8 s).
        let mut t = s.clone();
        t.first_check_min = Duration::from_secs(2);
        t.max_backoff = Duration::from_secs(8);
        assert_eq!(next_check_delay(&t, false, 1, 0.5), Duration::from_secs(2));
        assert_eq!(next_check_delay(&t, false, 5, 0.5), Duration::from_secs(8));
    }

    #[test]
    fn the_qemu_image_configuration_is_valid() {
        // As written by qemu's AgentImageConfig::to_toml for a test image.
        let s = crate::config::from_fragments(&[(
            "/usr/lib/twinroot/agent.d/00-image.toml",
            "[agent]\ndisk = \"/dev/vda\"\nstate_dir = \"/state/twinroot-agent\"\nkeyring = \"/usr/lib/twinroot/keyring.json\"\nmachine_id_path = \"/state/machine-id\"\n\n[server]\nurl = \"http://10.0.2.2:8080/v1/update/\"\ntrack = \"stable\"\nfirst_check_min_secs = 2\nfirst_check_max_secs = 2\ninterval_secs = 2\njitter_secs = 0\nmax_backoff_secs = 8\n\n[checks]\ndir = \"/usr/lib/twinroot/checks\"\nserver_reachable = true\nsystem_not_degraded = false\n\n[reboot]\nstrategy = \"coordinated\"\nmethod = \"syscall\"\nfleetlock_url = \"http://10.0.2.2:8081\"\n\n[dbus]\nbus = \"none\"\n",
        ), ("/run/twinroot/agent.d/10-booted-slot.toml", "[agent]\nbooted_slot = \"b\"\n")])
        .unwrap();
        assert_eq!(
            s.agent.booted_slot,
            crate::config::BootedSlotSource::Fixed(twinroot_format::slot::SlotName::B)
        );
        assert_eq!(
            next_check_delay(&s.server, true, 0, 0.3),
            Duration::from_secs(2)
        );
        assert_eq!(s.bus, crate::config::BusChoice::None);
    }
}

//! Post-boot checks, revert and rollback reporting: the agent core on disk image files against a
//! real HTTP server (Omaha + bundle + FleetLock), with the boot selector applied between boots.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use twinroot_format::keyring::Keyring;
use twinroot_format::slot::SlotName;
use update_agent::agent::{
    Agent, AgentPolicy, BootOutcome, CheckOutcome, Host, Identity, RebootDecision,
};
use update_agent::apply::InstallPolicy;
use update_agent::config::RebootStrategy;
use update_agent::host::{HostChecks, RealSources};
use update_agent::net::{FleetLockClient, HttpOmaha, RebootLock, http_client};
use update_agent::reboot::{Clock, SystemClock};
use update_agent::sim::{self, RecordingRebooter};
use update_agent::slots::{BootedSlot, GptSlotTable};
use update_agent::state::{FileStateStore, StateStore};

struct World {
    dir: tempfile::TempDir,
    disk: PathBuf,
    keyring: PathBuf,
    server: TestServer,
    rt: tokio::runtime::Runtime,
    reboots: Arc<AtomicU32>,
    image: Vec<u8>,
    bundle_size: u64,
    signing: Vec<ed25519_dalek::SigningKey>,
}

fn world(strategy_lock: bool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), 8 * MIB, &image(MIB as usize, 1));
    let keys = keys(dir.path());
    let img = image(3 * MIB as usize, 2);
    let bundle = bundle_of("1.1.0", &img, &keys.signing);
    let server = TestServer::start();
    let size = bundle.len() as u64;
    server.put("/payloads/os-1.1.0.tbdl", bundle);
    let base = server.url("/payloads/");
    server.on_post(move |path, _body| match path {
        "/v1/update/" => (
            200,
            omaha_response(APP_ID, Some((&base, "os-1.1.0.tbdl", "1.1.0", size))),
        ),
        "/v1/pre-reboot" | "/v1/steady-state" if strategy_lock => (200, String::new()),
        _ => (404, String::new()),
    });
    World {
        disk,
        keyring: keys.keyring_path,
        server,
        rt: tokio::runtime::Runtime::new().unwrap(),
        reboots: Arc::new(AtomicU32::new(0)),
        image: img,
        bundle_size: size,
        signing: keys.signing,
        dir,
    }
}

fn hook(dir: &Path, sub: &str, name: &str, script: &str) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

impl World {
    fn checks_dir(&self, version: &str) -> PathBuf {
        self.dir.path().join(format!("checks-{version}"))
    }

    /// `version`'s required check `50-app` fails ("app down").
    fn break_app_in(&self, version: &str) {
        hook(
            &self.checks_dir(version),
            "required.d",
            "50-app",
            "echo app down >&2; exit 1",
        );
    }

    /// A fresh agent process on the host as it booted now.
    fn agent(&self, booted: SlotName, version: &str, strategy: RebootStrategy) -> Agent {
        self.agent_of(&self.server.url("/v1/update/"), booted, version, strategy)
    }

    /// The same, asking the update server at `omaha_url`.
    fn agent_of(
        &self,
        omaha_url: &str,
        booted: SlotName,
        version: &str,
        strategy: RebootStrategy,
    ) -> Agent {
        let client = http_client(Duration::from_secs(10)).unwrap();
        let lock: Option<Box<dyn RebootLock>> =
            (strategy == RebootStrategy::Coordinated).then(|| {
                Box::new(FleetLockClient {
                    client: client.clone(),
                    rt: self.rt.handle().clone(),
                    base_url: self.server.url(""),
                    id: "machine-1".into(),
                    group: "default".into(),
                }) as Box<dyn RebootLock>
            });
        let host = Host {
            slots: Box::new(GptSlotTable::open(&self.disk, BootedSlot::new(booted)).unwrap()),
            store: Box::new(FileStateStore::new(self.dir.path().join("state"))),
            omaha: Some(Box::new(HttpOmaha {
                client: client.clone(),
                rt: self.rt.handle().clone(),
                url: omaha_url.to_string(),
            })),
            sources: Box::new(RealSources {
                client,
                rt: self.rt.handle().clone(),
            }),
            lock,
            rebooter: Box::new(RecordingRebooter {
                requests: self.reboots.clone(),
            }),
            clock: Box::new(SystemClock),
            checks: Box::new(HostChecks {
                dir: self.checks_dir(version),
                timeout: Duration::from_secs(20),
                system_not_degraded: false,
                rt: self.rt.handle().clone(),
            }),
        };
        let policy = AgentPolicy {
            install: InstallPolicy {
                current_version: version.parse().unwrap(),
                allow_downgrade: false,
                board: None,
                tries: 1,
                download_retries: 2,
                retry_base: Duration::from_millis(10),
                checkpoint_every: MIB,
                readback_from_medium: true,
            },
            strategy,
            windows: vec![],
            check_server_reachable: true,
            server_reachable_grace: Duration::from_secs(300),
        };
        let identity = Identity {
            app_id: APP_ID.into(),
            track: "stable".into(),
            machine_id: "machine-1".into(),
            boot_id: "{boot}".into(),
            board: None,
        };
        Agent::new(
            host,
            BootedSlot::new(booted),
            identity,
            policy,
            Keyring::load(&self.keyring).unwrap(),
        )
    }

    fn power_cycle(&self) -> SlotName {
        let mut table = GptSlotTable::open(&self.disk, BootedSlot::new(SlotName::A)).unwrap();
        sim::boot(&mut table).unwrap().expect("a bootable slot")
    }

    fn state(&self) -> update_agent::state::PersistentState {
        FileStateStore::new(self.dir.path().join("state"))
            .load()
            .unwrap()
    }

    /// The agent on slot A (1.0.0) after a boot that came back from `version`: it reports the
    /// rollback.
    fn back_on_a_after(&self, version: &str) -> Agent {
        let mut agent = self.agent(SlotName::A, "1.0.0", RebootStrategy::Immediate);
        assert_eq!(
            agent.after_boot().unwrap(),
            BootOutcome::RolledBack {
                version: version.into()
            }
        );
        agent
    }

    /// Installs 1.1.0 from A and reboots into it.
    fn stage_and_boot_new(&self, strategy: RebootStrategy) -> SlotName {
        let mut agent = self.agent(SlotName::A, "1.0.0", strategy);
        assert_eq!(agent.after_boot().unwrap(), BootOutcome::Steady);
        assert_eq!(
            agent.check().unwrap(),
            CheckOutcome::Installed {
                version: "1.1.0".into()
            }
        );
        assert_eq!(
            slot_bytes(&self.disk, SlotName::B, self.image.len() as u64),
            self.image
        );
        assert_eq!(
            agent.reboot_if_due(false).unwrap(),
            RebootDecision::Rebooted
        );
        assert_eq!(self.reboots.load(Ordering::SeqCst), 1);
        self.power_cycle()
    }
}

#[test]
fn failed_required_hook_reverts_and_the_old_slot_reports_the_rollback() {
    let w = world(false);
    w.break_app_in("1.1.0");
    let slot = w.stage_and_boot_new(RebootStrategy::Immediate);
    assert_eq!(slot, SlotName::B);

    let mut agent = w.agent(SlotName::B, "1.1.0", RebootStrategy::Immediate);
    match agent.after_boot().unwrap() {
        BootOutcome::MarkedBad { version, reason } => {
            assert_eq!(version, "1.1.0");
            assert!(
                reason.contains("50-app") && reason.contains("app down"),
                "{reason}"
            );
        }
        other => panic!("expected MarkedBad, got {other:?}"),
    }
    let s = slots(&w.disk);
    assert_eq!(s[1].attrs.priority, 0, "bad slot B must be unbootable");
    assert!(s[0].attrs.is_bootable());
    // The agent restarts before its reboot went through: the verdict stands, no re-check.
    drop(agent);
    let health_events = |w: &World| {
        w.server
            .omaha_events()
            .iter()
            .filter(|e| **e == (3, 0, Some(40)))
            .count()
    };
    assert_eq!(health_events(&w), 1);
    let mut agent = w.agent(SlotName::B, "1.1.0", RebootStrategy::Immediate);
    assert!(matches!(
        agent.after_boot().unwrap(),
        BootOutcome::MarkedBad { .. }
    ));
    assert_eq!(health_events(&w), 1);
    assert_eq!(
        agent.reboot_if_due(false).unwrap(),
        RebootDecision::Rebooted
    );
    assert_eq!(w.power_cycle(), SlotName::A);

    let mut agent = w.back_on_a_after("1.1.0");
    let events = w.server.omaha_events();
    assert!(events.contains(&(13, 1, None)), "{events:?}");
    assert!(events.contains(&(14, 1, None)), "{events:?}");
    assert!(events.contains(&(3, 1, None)), "{events:?}");
    assert!(
        events.contains(&(3, 0, Some(40))),
        "health check failure: {events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&(3, 0, Some(44))),
        "rollback last: {events:?}"
    );
    let rollback_req = w.server.omaha_requests().pop().unwrap();
    assert_eq!(rollback_req.apps[0].version.as_deref(), Some("1.0.0"));
    assert_eq!(
        rollback_req.apps[0].events[0].previous_version.as_deref(),
        Some("1.1.0")
    );
    assert!(w.state().is_quarantined("1.1.0"));

    // The server still offers 1.1.0: refused, slot B stays unbootable.
    match agent.check().unwrap() {
        CheckOutcome::Refused { version, .. } => assert_eq!(version, "1.1.0"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!slots(&w.disk)[1].attrs.is_bootable());
    assert_eq!(agent.reboot_if_due(false).unwrap(), RebootDecision::Nothing);
}

/// A clock the test moves by hand.
#[derive(Clone)]
struct HandClock(Arc<std::sync::Mutex<jiff::Timestamp>>);

impl HandClock {
    fn advance(&self, secs: i64) {
        let mut t = self.0.lock().unwrap();
        *t = t
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap();
    }
}

impl Clock for HandClock {
    fn now(&self) -> jiff::Timestamp {
        *self.0.lock().unwrap()
    }
}

/// An Omaha URL on a loopback port nothing listens on.
fn dead_omaha_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}/v1/update/")
}

impl World {
    /// The agent on the freshly booted slot B (1.1.0) asking a server that is down, on a hand
    /// clock.
    fn new_boot_with_server_down(&self) -> (Agent, HandClock) {
        assert_eq!(
            self.stage_and_boot_new(RebootStrategy::Immediate),
            SlotName::B
        );
        let mut agent = self.agent_of(
            &dead_omaha_url(),
            SlotName::B,
            "1.1.0",
            RebootStrategy::Immediate,
        );
        let clock = HandClock(Arc::new(std::sync::Mutex::new(jiff::Timestamp::now())));
        agent.host.clock = Box::new(clock.clone());
        (agent, clock)
    }
}

fn assert_pending(outcome: BootOutcome) {
    match outcome {
        BootOutcome::ChecksPending {
            version,
            reason,
            retry_in,
        } => {
            assert_eq!(version, "1.1.0");
            assert!(reason.contains("not reachable"), "{reason}");
            assert!(retry_in <= Duration::from_secs(30), "{retry_in:?}");
        }
        other => panic!("expected ChecksPending, got {other:?}"),
    }
}

#[test]
fn a_server_outage_at_boot_keeps_the_new_slot_pending_and_it_is_marked_good_when_the_server_is_back()
 {
    let w = world(false);
    let (mut agent, clock) = w.new_boot_with_server_down();
    let before = slots(&w.disk);
    assert_pending(agent.after_boot().unwrap());
    clock.advance(200);
    assert_pending(agent.after_boot().unwrap());
    // Nothing was marked while pending, and no failure was reported.
    assert_eq!(slots(&w.disk), before);
    assert!(!w.server.omaha_events().contains(&(3, 0, Some(40))));

    // The server is back within the grace period: the boot is judged good.
    agent.host.omaha = Some(Box::new(HttpOmaha {
        client: http_client(Duration::from_secs(10)).unwrap(),
        rt: w.rt.handle().clone(),
        url: w.server.url("/v1/update/"),
    }));
    assert_eq!(
        agent.after_boot().unwrap(),
        BootOutcome::MarkedGood {
            version: "1.1.0".into()
        }
    );
    let s = slots(&w.disk);
    assert!(
        s[1].attrs.successful && s[1].attrs.is_bootable(),
        "{}",
        s[1].attrs
    );
}

#[test]
fn a_server_still_unreachable_after_the_grace_period_fails_the_new_boot() {
    let w = world(false);
    let (mut agent, clock) = w.new_boot_with_server_down();
    assert_pending(agent.after_boot().unwrap());
    clock.advance(301);
    match agent.after_boot().unwrap() {
        BootOutcome::MarkedBad { version, reason } => {
            assert_eq!(version, "1.1.0");
            assert!(reason.contains("not reachable"), "{reason}");
        }
        other => panic!("expected MarkedBad, got {other:?}"),
    }
    let s = slots(&w.disk);
    assert_eq!(s[1].attrs.priority, 0, "bad slot B must be unbootable");
    assert!(s[0].attrs.is_bootable());
}

#[test]
fn wanted_hook_failure_still_marks_good_and_releases_the_reboot_slot() {
    let w = world(true);
    hook(&w.checks_dir("1.1.0"), "required.d", "10-ok", "echo fine");
    hook(
        &w.checks_dir("1.1.0"),
        "wanted.d",
        "20-slow-cache",
        "echo cache cold >&2; exit 2",
    );
    assert_eq!(
        w.stage_and_boot_new(RebootStrategy::Coordinated),
        SlotName::B
    );
    let paths: Vec<String> = w.server.seen().iter().map(|s| s.path.clone()).collect();
    assert!(paths.contains(&"/v1/pre-reboot".to_string()), "{paths:?}");
    assert!(
        !paths.contains(&"/v1/steady-state".to_string()),
        "{paths:?}"
    );
    assert!(w.state().reboot_lock_held);

    let mut agent = w.agent(SlotName::B, "1.1.0", RebootStrategy::Coordinated);
    assert_eq!(
        agent.after_boot().unwrap(),
        BootOutcome::MarkedGood {
            version: "1.1.0".into()
        }
    );
    let report = agent.last_report.clone().unwrap();
    assert!(report.healthy());
    let warning = report.warnings().next().unwrap();
    assert_eq!(warning.name, "20-slow-cache");
    assert_eq!(warning.stderr, "cache cold\n");
    let s = slots(&w.disk);
    assert!(
        s[1].attrs.successful && s[1].attrs.tries == 0 && s[1].attrs.priority > s[0].attrs.priority
    );
    assert!(w.server.omaha_events().contains(&(3, 2, None)));
    // The slot is given back before the server hears the host is complete.
    let seen = w.server.seen();
    let released_at = seen.iter().position(|s| s.path == "/v1/steady-state");
    let complete_at = seen.iter().position(|s| {
        s.method == "POST"
            && s.path == "/v1/update/"
            && twinroot_format::omaha::Request::parse(&s.body)
                .unwrap()
                .apps
                .iter()
                .any(|a| {
                    a.events
                        .iter()
                        .any(|e| e.event_type == 3 && e.event_result == 2)
                })
    });
    assert!(
        released_at.is_some() && released_at < complete_at,
        "{released_at:?} {complete_at:?}"
    );
    assert!(!w.state().reboot_lock_held);
    // Until it reported 3/2, the new version never checked in without an event (a server
    // would count such a check-in as a completed update).
    for r in w.server.omaha_requests() {
        let app = &r.apps[0];
        if app.version.as_deref() == Some("1.1.0") {
            assert!(
                !app.events.is_empty(),
                "event-less check-in from 1.1.0: {r:?}"
            );
        }
    }
    assert_eq!(
        w.power_cycle(),
        SlotName::B,
        "the good new slot keeps booting"
    );
}

#[test]
fn a_new_slot_that_never_comes_up_is_rolled_back_by_the_boot_selector() {
    let w = world(false);
    assert_eq!(w.stage_and_boot_new(RebootStrategy::Immediate), SlotName::B);
    // The new OS crashes before the agent runs; the next power-on falls back to A.
    assert_eq!(w.power_cycle(), SlotName::A);
    w.back_on_a_after("1.1.0");
    assert_eq!(w.server.omaha_events().last(), Some(&(3, 0, Some(44))));
    assert_eq!(slots(&w.disk)[1].attrs.priority, 0);
    assert!(w.state().is_quarantined("1.1.0"));
}

#[test]
fn coordinated_reboot_waits_for_the_lock_and_the_maintenance_window() {
    let w = world(true);
    let base = w.server.url("/payloads/");
    let size = w.bundle_size;
    let pre_reboots = Arc::new(AtomicU32::new(0));
    let calls = pre_reboots.clone();
    w.server.on_post(move |path, _| match path {
        "/v1/update/" => (
            200,
            omaha_response(APP_ID, Some((&base, "os-1.1.0.tbdl", "1.1.0", size))),
        ),
        "/v1/pre-reboot" if calls.fetch_add(1, Ordering::SeqCst) == 0 => (
            409,
            r#"{"kind":"failed_lock","value":"all 1 reboot slots are taken"}"#.to_string(),
        ),
        "/v1/pre-reboot" | "/v1/steady-state" => (200, String::new()),
        _ => (404, String::new()),
    });
    let mut agent = w.agent(SlotName::A, "1.0.0", RebootStrategy::Coordinated);
    let clock = sim::ManualClock::default();
    agent.host.clock = Box::new(clock.clone());
    // Saturdays 22:00-23:00 UTC; 2026-11-21 is a Saturday.
    agent.policy.windows = vec![update_agent::config::MaintenanceWindow {
        days: vec![jiff::civil::Weekday::Saturday],
        start: jiff::civil::time(22, 0, 0, 0),
        length: Duration::from_secs(3600),
        time_zone: jiff::tz::TimeZone::UTC,
    }];
    let at = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    clock
        .unix_seconds
        .store(at("2026-11-21T21:00:00Z"), Ordering::SeqCst);
    agent.after_boot().unwrap();
    assert!(matches!(
        agent.check().unwrap(),
        CheckOutcome::Installed { .. }
    ));
    // A staged host keeps checking; the staged update stays what it waits for.
    assert_eq!(
        agent.check().unwrap(),
        CheckOutcome::AlreadyStaged {
            version: "1.1.0".into()
        }
    );
    assert_eq!(agent.operation().name(), "updated-need-reboot");

    assert_eq!(
        agent.reboot_if_due(false).unwrap(),
        RebootDecision::WaitForWindow(Duration::from_secs(3600))
    );
    assert_eq!(
        pre_reboots.load(Ordering::SeqCst),
        0,
        "no lock outside the window"
    );
    clock
        .unix_seconds
        .store(at("2026-11-21T22:10:00Z"), Ordering::SeqCst);
    match agent.reboot_if_due(false).unwrap() {
        RebootDecision::LockBusy(msg) => {
            assert!(msg.contains("409") && msg.contains("failed_lock"), "{msg}")
        }
        other => panic!("expected LockBusy, got {other:?}"),
    }
    assert_eq!(w.reboots.load(Ordering::SeqCst), 0);
    assert_eq!(
        agent.reboot_if_due(false).unwrap(),
        RebootDecision::Rebooted
    );
    assert_eq!(w.reboots.load(Ordering::SeqCst), 1);
    assert!(w.state().reboot_lock_held);
}

/// The whole loop with the real update-server process: the host rolls back from 2.0.0 and
/// quarantines it; the server stops offering it to this host; an operator lifts the quarantine
/// (`update-server instances lift-quarantine`); the agent forgets its own quarantine on its next
/// check and installs 2.0.0.
#[test]
fn a_quarantine_lifted_on_the_update_server_lets_the_host_install_the_release_again() {
    let w = world(false);
    w.break_app_in("2.0.0");
    let server = UpdateServerProcess::start(w.dir.path(), &w.keyring);
    let img = image(3 * MIB as usize, 21);
    let bundle = w.dir.path().join("2.0.0.bundle");
    std::fs::write(&bundle, real_bundle("2.0.0", &img, &w.signing)).unwrap();
    server.cli(&["release", "upload"], &[bundle.to_str().unwrap()]);
    server.cli(
        &["release", "promote"],
        &["2.0.0", "--channel", "stable", "--force"],
    );
    let omaha = format!("{}/v1/update/", server.base);
    let agent_on = |slot, version| w.agent_of(&omaha, slot, version, RebootStrategy::Immediate);

    // 1.0.0 installs 2.0.0, boots it, fails the required check, reverts.
    let mut agent = agent_on(SlotName::A, "1.0.0");
    assert_eq!(agent.after_boot().unwrap(), BootOutcome::Steady);
    let installed = CheckOutcome::Installed {
        version: "2.0.0".into(),
    };
    assert_eq!(agent.check().unwrap(), installed);
    assert_eq!(
        agent.reboot_if_due(false).unwrap(),
        RebootDecision::Rebooted
    );
    assert_eq!(w.power_cycle(), SlotName::B);
    let mut agent = agent_on(SlotName::B, "2.0.0");
    assert!(matches!(
        agent.after_boot().unwrap(),
        BootOutcome::MarkedBad { .. }
    ));
    assert_eq!(
        agent.reboot_if_due(false).unwrap(),
        RebootDecision::Rebooted
    );
    assert_eq!(w.power_cycle(), SlotName::A);
    let mut agent = agent_on(SlotName::A, "1.0.0");
    assert_eq!(
        agent.after_boot().unwrap(),
        BootOutcome::RolledBack {
            version: "2.0.0".into()
        }
    );
    assert!(w.state().is_quarantined("2.0.0"));

    // Quarantined on both sides: the next check installs nothing.
    let outcome = agent.check().unwrap();
    assert!(
        matches!(
            &outcome,
            CheckOutcome::NoUpdate | CheckOutcome::Refused { .. }
        ),
        "{outcome:?}"
    );
    assert!(!slots(&w.disk)[1].attrs.is_bootable());
    assert!(w.state().is_quarantined("2.0.0"));

    // The operator lifts it; the agent's next check forgets the quarantine and installs.
    server.cli(&["instances", "lift-quarantine"], &["machine-1", "2.0.0"]);
    let signals = Arc::new(AtomicU32::new(0));
    let counter = signals.clone();
    agent.observer = Some(Box::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    assert_eq!(agent.check().unwrap(), installed);
    assert!(!w.state().is_quarantined("2.0.0"));
    assert!(signals.load(Ordering::SeqCst) > 0);
    assert_eq!(slot_bytes(&w.disk, SlotName::B, img.len() as u64), img);
    let s = slots(&w.disk);
    assert_eq!(
        twinroot_format::slot::choose_boot(&s).unwrap().slot,
        SlotName::B
    );
}

//! The daemon as a process: D-Bus API through a private dbus-daemon, and running with no bus.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use twinroot_format::slot::{SlotAttrs, SlotName};
use update_agent::dbus::Agent1Proxy;

/// A private bus: `dbus-daemon --config-file` with a socket in a temp dir; killed on drop.
struct PrivateBus {
    child: Child,
    address: String,
}

impl PrivateBus {
    fn start(dir: &Path) -> PrivateBus {
        let socket = dir.join("bus.sock");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("dbus-daemon (Debian package dbus) must be installed");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        PrivateBus {
            child,
            address: line.trim().to_string(),
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent daemon process; SIGTERM then reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

struct Host {
    dir: tempfile::TempDir,
    disk: PathBuf,
    conf: PathBuf,
}

fn host(config: &str) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path(), 8 * MIB, &image(MIB as usize, 1));
    let keys = keys(dir.path());
    let conf = dir.path().join("agent.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("00-test.toml"),
        format!(
            "[agent]\ndisk = \"{}\"\nkeyring = \"{}\"\nstate_dir = \"{}\"\nos_release = \"{}\"\nmachine_id_path = \"{}\"\n\
             [reboot]\nstrategy = \"off\"\n[checks]\nsystem_not_degraded = false\n{config}",
            disk.display(),
            keys.keyring_path.display(),
            dir.path().join("state").display(),
            dir.path().join("os-release").display(),
            dir.path().join("machine-id").display(),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    // Keep the signing key for bundles next to the host.
    std::fs::write(
        dir.path().join("signing.key"),
        twinroot_format::keyring::private_key_pem(&keys.signing[0]),
    )
    .unwrap();
    Host { dir, disk, conf }
}

impl Host {
    fn os_release(&self, version: &str) {
        std::fs::write(
            self.dir.path().join("os-release"),
            format!("NAME=twinroot\nVERSION_ID={version}\n"),
        )
        .unwrap();
    }

    fn signing_key(&self) -> ed25519_dalek::SigningKey {
        twinroot_format::keyring::load_signing_key(&self.dir.path().join("signing.key")).unwrap()
    }

    fn daemon(&self, extra: &[&str]) -> Daemon {
        Daemon(
            Command::new(agent_bin())
                .arg("--config-dir")
                .arg(&self.conf)
                .args(extra)
                .arg("daemon")
                .env("UPDATE_AGENT_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        run_agent(&self.conf, args)
    }
}

#[test]
fn dbus_status_check_now_and_state_signals_on_a_private_bus() {
    let h = host("");
    h.os_release("1.0.0");
    let img = image(3 * MIB as usize, 5);
    let bundle = bundle_of("1.1.0", &img, &[h.signing_key()]);
    let server = TestServer::start();
    let size = bundle.len() as u64;
    server.put("/p/os-1.1.0", bundle);
    let base = server.url("/p/");
    server.on_post(move |_, _| {
        (
            200,
            omaha_response(APP_ID, Some((&base, "os-1.1.0", "1.1.0", size))),
        )
    });
    std::fs::write(
        h.conf.join("20-server.toml"),
        format!(
            "[server]\nurl = \"{}\"\nfirst_check_min_secs = 3600\nfirst_check_max_secs = 3600\n",
            server.url("/v1/update/")
        ),
    )
    .unwrap();
    // This host once rolled back from 0.9.0: the state file says so, and so does the bus.
    {
        use update_agent::state::{FileStateStore, PersistentState, StateStore};
        let mut state = PersistentState::default();
        state.quarantine("0.9.0");
        FileStateStore::new(h.dir.path().join("state"))
            .save(&state)
            .unwrap();
    }
    let bus = PrivateBus::start(h.dir.path());
    let _daemon = h.daemon(&["--bus", &bus.address, "--booted-slot", "a"]);

    wait_for("the agent on the bus", Duration::from_secs(30), || {
        h.cli(&["--bus", &bus.address, "status"]).status.success()
    });
    let out = h.cli(&["--bus", &bus.address, "status"]);
    let text_out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text_out.contains("operation: idle"), "{}", text(&out));
    assert!(text_out.contains("quarantined: 0.9.0"), "{}", text(&out));
    assert!(
        text_out.contains("current version: 1.0.0"),
        "{}",
        text(&out)
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (outcome, ops) = rt.block_on(async {
        use futures_lite::StreamExt;
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        let proxy = Agent1Proxy::new(&conn).await.unwrap();
        assert_eq!(proxy.get_quarantined().await.unwrap(), ["0.9.0"]);
        // The operator lifts it on the host: the CLI asks the daemon, which writes the state.
        let out = h.cli(&["--bus", &bus.address, "unquarantine", "0.9.0"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("0.9.0 may be installed again"),
            "{}",
            text(&out)
        );
        assert!(proxy.get_quarantined().await.unwrap().is_empty());
        let state = std::fs::read_to_string(h.dir.path().join("state/agent-state.json")).unwrap();
        assert!(!state.contains("0.9.0"), "{state}");
        let out = h.cli(&["--bus", &bus.address, "unquarantine", "0.9.0"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("0.9.0 is not quarantined"),
            "{}",
            text(&out)
        );
        let mut signals = proxy.receive_state_changed().await.unwrap();
        let outcome = proxy.check_now().await.unwrap();
        let mut ops = Vec::new();
        while let Some(sig) = tokio::time::timeout(Duration::from_secs(10), signals.next())
            .await
            .ok()
            .flatten()
        {
            let args = sig.args().unwrap();
            ops.push((args.operation.clone(), args.new_version.clone()));
            if args.operation == "updated-need-reboot" {
                break;
            }
        }
        (outcome, ops)
    });
    assert_eq!(outcome, "installed 1.1.0");
    let names: Vec<&str> = ops.iter().map(|(o, _)| o.as_str()).collect();
    assert!(names.contains(&"checking-for-update"), "{ops:?}");
    assert!(names.contains(&"downloading"), "{ops:?}");
    assert_eq!(
        ops.last(),
        Some(&("updated-need-reboot".to_string(), "1.1.0".to_string()))
    );

    let out = h.cli(&["--bus", &bus.address, "status"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("operation: updated-need-reboot"),
        "{}",
        text(&out)
    );
    assert!(s.contains("new version: 1.1.0"), "{}", text(&out));
    assert!(s.contains("last check: "), "{}", text(&out));
    assert_eq!(slot_bytes(&h.disk, SlotName::B, img.len() as u64), img);
    let events = server.omaha_events();
    assert!(
        events.contains(&(13, 1, None)) && events.contains(&(3, 1, None)),
        "{events:?}"
    );
    let req = &server.omaha_requests()[0];
    assert_eq!(
        req.apps[0].machine_id.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );

    // Operator rollback over the bus cancels the staged update.
    let out = h.cli(&["--bus", &bus.address, "rollback"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled staged update 1.1.0"));
    assert!(!slots(&h.disk)[1].attrs.is_bootable());
}

#[test]
fn daemon_without_a_bus_checks_a_new_boot_and_marks_it_good() {
    let h = host("[dbus]\nbus = \"none\"\n");
    h.os_release("2.0.0");
    // The host booted slot B for the first time (try consumed, not yet successful), via the
    // kernel command line.
    let mut d = twinroot_format::gpt::SlotDisk::open_rw(&h.disk).unwrap();
    d.set_attrs(
        SlotName::B,
        SlotAttrs {
            priority: 2,
            tries: 0,
            successful: false,
        },
    )
    .unwrap();
    drop(d);
    let cmdline = h.dir.path().join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0 twinroot.slot=b quiet\n").unwrap();
    std::fs::write(
        h.conf.join("30-cmdline.toml"),
        format!("[agent]\ncmdline_path = \"{}\"\n", cmdline.display()),
    )
    .unwrap();
    let checks = h.dir.path().join("checks/required.d");
    std::fs::create_dir_all(&checks).unwrap();
    let hook = checks.join("10-ok");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        h.conf.join("40-checks.toml"),
        format!(
            "[checks]\ndir = \"{}\"\n",
            h.dir.path().join("checks").display()
        ),
    )
    .unwrap();

    let _daemon = h.daemon(&[]);
    // The agent marks the slot, then records the slot's version in its state file.
    let state = h.dir.path().join("state/agent-state.json");
    wait_for(
        "slot B marked good and recorded",
        Duration::from_secs(30),
        || {
            slots(&h.disk)[1].attrs.successful
                && std::fs::read_to_string(&state).is_ok_and(|t| t.contains("\"b\": \"2.0.0\""))
        },
    );
    let s = slots(&h.disk);
    assert_eq!(s[1].attrs.tries, 0);
    assert!(s[1].attrs.priority > s[0].attrs.priority);
    // Without a bus, `status` reads the state file and the slot table; `check` says why not.
    let out = h.cli(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        o.contains("slot b: priority=2 tries=0 successful=1 (2.0.0)"),
        "{}",
        text(&out)
    );
    let out = h.cli(&["check"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none"),
        "{}",
        text(&out)
    );
    // Without a bus, `unquarantine` edits the state file itself.
    {
        use update_agent::state::{FileStateStore, StateStore};
        let mut store = FileStateStore::new(h.dir.path().join("state"));
        let mut st = store.load().unwrap();
        st.quarantine("3.0.0");
        store.save(&st).unwrap();
    }
    let out = h.cli(&["unquarantine", "3.0.0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!std::fs::read_to_string(&state).unwrap().contains("3.0.0"));
    let out = h.cli(&["unquarantine", "3.0.0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3.0.0 is not quarantined"),
        "{}",
        text(&out)
    );
}

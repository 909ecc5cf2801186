//! Scenario 1 (update), first form: a host on v1 polls the real update-server, installs v2 into
//! slot B, reboots by itself (reboot strategy `immediate`), boots B, passes its checks, marks B
//! good, and the server shows the host Complete on v2.
//!
//! Needs the `update-agent` and `update-server` binaries of the same profile (`scripts/test`
//! builds all binaries first; alone: `cargo build -p update-agent -p update-server`).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use twinroot_e2e::{BOOT_TIMEOUT, Lab};
use twinroot_format::slot::SlotName;
use twinroot_qemu::harness::{
    GOOD, Host, Service, ServiceConfig, SigningSetup, free_port, guest_url, workspace_binary,
};
use twinroot_qemu::rootfs::{AgentImageConfig, AgentSpec};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

/// Runs `update-server ARGS` and returns its stdout.
fn server_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(workspace_binary("update-server")?)
        .args(args)
        .output()
        .context("running update-server")?;
    if !out.status.success() {
        bail!(
            "update-server {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn host_updates_from_the_server_and_reboots_into_v2() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let data = lab.path().join("server");
    std::fs::create_dir_all(&data)?;

    let mut server = Service::start(ServiceConfig {
        name: "update-server".into(),
        program: workspace_binary("update-server")?,
        args: vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.display().to_string(),
            "--keyring".into(),
            keys.keyring.display().to_string(),
        ],
        env: Vec::new(),
        log: lab.path().join("server.log"),
    })?;
    server.wait_port(port, Duration::from_secs(60))?;
    let token = server_cli(&[
        "token",
        "create",
        "--data-dir",
        &data.display().to_string(),
        "--role",
        "admin",
    ])?;
    let token = token.trim();

    let mut agent = AgentImageConfig::new(&guest_url(port, "/v1/update/"), "stable");
    agent.poll_secs = 2;
    let image = |version: &str| -> Result<std::path::PathBuf> {
        let mut spec = lab.kit.rootfs(version);
        spec.include_kernel = false;
        spec.keyring = Some(std::fs::read(&keys.keyring)?);
        spec.agent = Some(AgentSpec {
            binary: workspace_binary("update-agent")?,
            args: vec!["daemon".into()],
            config: agent.to_toml(),
        });
        lab.kit.image(&format!("v{version}"), &spec)
    };
    let v1 = image("1.0.0")?;
    let v2 = image("2.0.0")?;
    let bundle = lab.path().join("v2.bundle");
    keys.bundle(&v2, "2.0.0", &bundle)?;
    let conn = ["--server", &base, "--token", token];
    server_cli(
        &[
            &["release", "upload"][..],
            &conn,
            &[&bundle.display().to_string()],
        ]
        .concat(),
    )?;
    server_cli(
        &[
            &["release", "promote"][..],
            &conn,
            &["2.0.0", "--channel", "stable", "--force"],
        ]
        .concat(),
    )?;

    let disk = lab.kit.disk("host")?;
    disk.write_slot(SlotName::A, &v1)?;
    disk.set_attrs(SlotName::A, GOOD)?;
    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot b from /dev/vda4", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
    let updated = started.elapsed();

    // The server sees the host Complete on 2.0.0 once the agent reported its good boot.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let instance = loop {
        let list: serde_json::Value = serde_json::from_str(&server_cli(
            &[&["instances"][..], &conn, &["--json"]].concat(),
        )?)?;
        let first = list.as_array().and_then(|a| a.first()).cloned();
        if let Some(i) = &first
            && i["version"] == "2.0.0"
            && i["status"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("complete"))
        {
            break i.clone();
        }
        if Instant::now() >= deadline {
            bail!(
                "server never showed the host Complete on 2.0.0: {list}\nserver log:\n{}",
                server.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "v1 -> v2 through the server: rebooted into v2 after {:.1} s, Complete after {:.1} s",
        updated.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    host.stop()?;
    let slots = disk.slots()?.map(|s| s.attrs);
    assert!(
        slots[1].successful && slots[1].is_bootable(),
        "slot b: {}",
        slots[1]
    );
    assert_eq!(instance["channel"], "stable");
    Ok(())
}

//! Scenario 3 (broken boot) through the real update-server: v4's init crashes (kernel panic).
//! The host on v1 installs v4 into B and reboots; B panics, its single try is spent, the kernel
//! reboots and the boot selector comes back to A by itself. The agent on v1 sees the rollback,
//! marks B unbootable, quarantines 4.0.0, reports the rollback (Omaha error code 44) to the
//! server, and never installs 4.0.0 again.
//!
//! Needs the `update-agent` and `update-server` binaries of the same profile.

use std::time::Instant;

use anyhow::Result;
use twinroot_e2e::{BOOT_TIMEOUT, Lab, UpdateServer, agent_image};
use twinroot_format::slot::SlotAttrs;
use twinroot_qemu::harness::{Host, SigningSetup, guest_url};
use twinroot_qemu::rootfs::{AgentImageConfig, ExtraFile, InitBehaviour, PANIC_LINE};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

#[test]
fn broken_release_panics_and_the_host_comes_back_on_its_own() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");

    let v1 = agent_image(&lab, &keys, &agent, "1.0.0", vec![])?;
    let mut v4 = lab.kit.rootfs("4.0.0");
    v4.include_kernel = false;
    v4.init = InitBehaviour::Panic;
    let v4 = lab.kit.image("v4", &v4)?;
    server.publish(&keys, &v4, "4.0.0", "stable")?;

    let disk = lab.disk_on("host", &v1)?;
    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("update staged version=4.0.0", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: slot b tries 1 -> 0 written", BOOT_TIMEOUT)?;
    host.wait_for(PANIC_LINE, BOOT_TIMEOUT)?;
    host.wait_for("Kernel panic", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("rolled back", BOOT_TIMEOUT)?;
    let back = started.elapsed();
    // Update checks go on after the rollback; 4.0.0 is not installed again (the server stops
    // offering it to this host, and the agent has quarantined it anyway).
    host.wait_for("update check outcome=", BOOT_TIMEOUT)?;

    let instance = server
        .wait_for_instance("server never recorded the rollback (error code 44)", |i| {
            i["error_code"].as_i64() == Some(44)
        })?;
    eprintln!(
        "v4 panicked, back on v1 after {:.1} s; server instance: {instance}",
        back.as_secs_f64()
    );
    assert_eq!(instance["version"], "1.0.0");
    assert_eq!(instance["status"], "rolled_back");
    assert_eq!(instance["failed_version"], "4.0.0");
    assert_eq!(
        host.count("update staged version=4.0.0"),
        1,
        "installed v4 twice"
    );
    host.stop()?;
    assert_eq!(disk.slots()?[1].attrs, SlotAttrs::UNBOOTABLE);
    Ok(())
}

/// Scenario 2 (failed health check): v3 carries a `required.d` hook that fails. The host boots
/// v3, fails the check, marks v3 bad, reboots into v1, reports the failure, and never installs v3
/// again; the server records the failed version.
#[test]
fn release_failing_its_health_check_is_reverted_and_reported() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");
    let image = |version: &str, files| agent_image(&lab, &keys, &agent, version, files);
    let v1 = image("1.0.0", vec![])?;
    let v3 = image(
        "3.0.0",
        vec![ExtraFile::required_check(
            "50-app",
            "echo app of v3 does not start; exit 1",
        )],
    )?;
    server.publish(&keys, &v3, "3.0.0", "stable")?;

    let disk = lab.disk_on("host", &v1)?;
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("update staged version=3.0.0", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 3.0.0 slot b", BOOT_TIMEOUT)?;
    host.wait_for("check failed check=50-app", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("update check outcome=", BOOT_TIMEOUT)?;

    let instance = server.wait_for_instance("server never recorded the failed 3.0.0", |i| {
        i["failed_version"] == "3.0.0" && i["version"] == "1.0.0"
    })?;
    eprintln!("v3 failed its check and was reverted; server instance: {instance}");
    assert_ne!(instance["status"], "complete");
    assert_eq!(
        host.count("update staged version=3.0.0"),
        1,
        "installed v3 twice"
    );
    host.stop()?;
    assert_eq!(disk.slots()?[1].attrs, SlotAttrs::UNBOOTABLE);
    Ok(())
}

//! Scenario 1 (update) through the real update-server: a host on v1 polls the server, installs v2
//! into slot B, reboots by itself, boots B, passes its checks, marks B good, and the server shows
//! the host Complete on v2. Once with `immediate` reboots, once `coordinated` through the real
//! reboot-coordinator (FleetLock on etcd), whose activity log must show the host taking the reboot
//! slot and giving it back.
//!
//! Needs the `update-agent`, `update-server` and `reboot-coordinator` binaries of the same profile
//! (`scripts/test` builds all binaries first).

use std::time::Instant;

use anyhow::{Result, bail};
use twinroot_e2e::{BOOT_TIMEOUT, Coordinator, Lab, UpdateServer, agent_image, is_complete};
use twinroot_qemu::harness::{Host, HostDisk, SigningSetup, guest_url};
use twinroot_qemu::rootfs::AgentImageConfig;

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

/// Publishes v2, boots a v1 host and waits until it is Complete on v2; returns the disk.
fn update_v1_to_v2(
    lab: &Lab,
    agent: &AgentImageConfig,
    keys: &SigningSetup,
    server: &UpdateServer,
) -> Result<HostDisk> {
    let v1 = agent_image(lab, keys, agent, "1.0.0", vec![])?;
    let v2 = agent_image(lab, keys, agent, "2.0.0", vec![])?;
    server.publish(keys, &v2, "2.0.0", &agent.track)?;

    let disk = lab.disk_on("host", &v1)?;
    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot b from /dev/vda4", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
    let rebooted = started.elapsed();

    // The server sees the host Complete on 2.0.0 once the agent reported its good boot.
    server.wait_for_instance("server never showed the host Complete on 2.0.0", |i| {
        i["version"] == "2.0.0" && i["channel"] == agent.track.as_str() && is_complete(i)
    })?;
    eprintln!(
        "v1 -> v2 through the server: booted v2 after {:.1} s, Complete after {:.1} s",
        rebooted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    host.stop()?;
    let slots = disk.slots()?.map(|s| s.attrs);
    assert!(
        slots[1].successful && slots[1].is_bootable(),
        "slot b: {}",
        slots[1]
    );
    Ok(disk)
}

#[test]
fn host_updates_from_the_server_and_reboots_into_v2() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");
    update_v1_to_v2(&lab, &agent, &keys, &server)?;
    Ok(())
}

#[test]
fn coordinated_update_takes_and_releases_the_reboot_slot() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let coordinator = Coordinator::start(&lab, 1)?;
    let mut agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "beta");
    agent.reboot_strategy = "coordinated".into();
    agent.fleetlock_url = Some(guest_url(coordinator.port, ""));
    update_v1_to_v2(&lab, &agent, &keys, &server)?;

    // The slot was taken before the reboot and given back once v2 passed its checks: the
    // activity log shows both for the same host, and nobody holds a slot any more.
    let status = coordinator.status()?;
    let events: Vec<(u64, &str, &str)> = status
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let at = w.next()?.parse().ok()?;
            let event = w.next()?;
            let id = l.split_whitespace().find_map(|x| x.strip_prefix("id="))?;
            Some((at, event, id))
        })
        .collect();
    let granted = events.iter().find(|e| e.1 == "granted");
    let released = events.iter().find(|e| e.1 == "released");
    match (granted, released) {
        (Some(g), Some(r)) if g.2 == r.2 && g.0 <= r.0 => {}
        _ => bail!("coordinator activity lacks granted then released for one host:\n{status}"),
    }
    assert!(
        !status
            .lines()
            .any(|l| l.contains("slots held") && !l.contains(": 0 of")),
        "a reboot slot is still held:\n{status}"
    );
    Ok(())
}

//! Scenario 4 (power cut during the download/write): a host on v1 starts writing v2 (a large
//! release: 64 MiB of incompressible data, so the write takes seconds under TCG) into slot B and
//! loses power in the middle. Slot B was made unbootable before the first byte was written, so
//! the next boot is v1 on slot A; the agent downloads v2 again, stages it, reboots into it, and
//! the server shows the host Complete on v2.
//!
//! The cut is placed from the host side, without timing guesses: the test watches the disk file
//! until the first MiB of slot B holds v2's first MiB (the guest has written part of it back),
//! and cuts at once. It then checks that the cut really landed mid-write: the agent had not
//! staged v2 yet (no `update staged` line) and slot B is still unbootable on disk.
//!
//! Needs the `update-agent` and `update-server` binaries of the same profile.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use twinroot_e2e::{BOOT_TIMEOUT, Lab, UpdateServer, agent_image, incompressible, is_complete};
use twinroot_format::gpt::DiskLayout;
use twinroot_format::slot::{SlotAttrs, SlotName};
use twinroot_qemu::harness::{GOOD, Host, HostDisk, SigningSetup, guest_url};
use twinroot_qemu::rootfs::{AgentImageConfig, ExtraFile};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

/// Slots large enough for v2 with its padding.
const LAYOUT: DiskLayout = DiskLayout {
    slot_size: 128 << 20,
    state_size: 32 << 20,
};
const PADDING: usize = 64 << 20;
const MIB: usize = 1 << 20;

#[test]
fn power_cut_mid_write_boots_v1_and_the_update_completes_after_restart() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");

    let v1 = agent_image(&lab, &keys, &agent, "1.0.0", vec![])?;
    let v2 = agent_image(
        &lab,
        &keys,
        &agent,
        "2.0.0",
        vec![ExtraFile::new(
            "/usr/share/twinroot/padding.bin",
            incompressible(PADDING, 2),
            0o644,
        )],
    )?;
    let v2_bytes = std::fs::read(&v2)?;
    ensure!(
        v2_bytes.len() > PADDING,
        "v2 image is only {} bytes: the padding was compressed away",
        v2_bytes.len()
    );
    server.publish(&keys, &v2, "2.0.0", "stable")?;

    let disk = HostDisk::create(&lab.path().join("host.disk"), &LAYOUT)?;
    disk.write_slot(SlotName::A, &v1)?;
    disk.set_attrs(SlotName::A, GOOD)?;
    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;

    // Cut the power as soon as the guest has written the beginning of v2 into slot B.
    let head = &v2_bytes[..MIB];
    poll_write_start(&disk, head, &host)?;
    host.power_cut()?;
    let cut_at = started.elapsed();
    ensure!(
        host.count("update staged version=2.0.0") == 0,
        "the power cut came too late: v2 was already staged"
    );
    let slots = disk.slots()?;
    assert_eq!(
        slots[1].attrs,
        SlotAttrs::UNBOOTABLE,
        "slot b after a cut mid-write"
    );
    assert_eq!(slots[0].attrs, GOOD, "slot a after a cut mid-write");
    let written = (0..v2_bytes.len().div_ceil(MIB))
        .take_while(|&i| {
            let end = ((i + 1) * MIB).min(v2_bytes.len());
            disk.read_slot(SlotName::B, (i * MIB) as u64, end - i * MIB)
                .is_ok_and(|b| b == v2_bytes[i * MIB..end])
        })
        .count();
    eprintln!(
        "power cut {:.1} s after start with {written} of {} MiB of v2 on disk",
        cut_at.as_secs_f64(),
        v2_bytes.len().div_ceil(MIB)
    );

    // Power back on: v1 boots (B is unbootable), the agent writes v2 again and reboots into it.
    let restarted = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.wait_for("update staged version=2.0.0", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot b from /dev/vda4", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
    let on_v2 = restarted.elapsed();
    // The host is found by its version, not as the only instance: when the cut comes within
    // ext4's commit interval of the first boot, /state/machine-id (written by rc.boot without a
    // sync) is lost with the power and the host checks in under a new machine id.
    let instance = server
        .wait_for_instance("server never showed the host Complete on 2.0.0", |i| {
            i["version"] == "2.0.0" && is_complete(i)
        })?;
    eprintln!(
        "after the restart: v2 booted in {:.1} s, Complete in {:.1} s; instance {instance}",
        on_v2.as_secs_f64(),
        restarted.elapsed().as_secs_f64()
    );
    host.stop()?;
    let b = disk.slots()?[1].attrs;
    assert!(b.successful && b.is_bootable(), "slot b at the end: {b}");
    Ok(())
}

/// Waits (polling the disk file every 20 ms) until slot B starts with `head`.
fn poll_write_start(disk: &HostDisk, head: &[u8], host: &Host) -> Result<()> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if disk.read_slot(SlotName::B, 0, head.len())? == head {
            return Ok(());
        }
        if host.count("update staged version=2.0.0") > 0 {
            bail!("v2 was staged before its first MiB was seen on the disk file");
        }
        if Instant::now() >= deadline {
            bail!(
                "the guest never started writing v2 into slot b; console:\n{}",
                host.console_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

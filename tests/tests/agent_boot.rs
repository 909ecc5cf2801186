//! The update agent inside real QEMU hosts, without an update server: after the boot selector
//! boots a staged slot, the agent's post-boot checks decide. Healthy -> the slot is marked good on
//! disk; a failing `required.d` hook -> the slot is marked bad and the host reboots into the old
//! slot by itself.
//!
//! Needs the `update-agent` binary of the same profile (`scripts/test` builds all binaries first;
//! alone: `cargo build -p update-agent`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use twinroot_e2e::{BOOT_TIMEOUT, Lab};
use twinroot_format::slot::{SlotAttrs, SlotName, staged};
use twinroot_qemu::harness::{GOOD, Host, HostDisk, SigningSetup};
use twinroot_qemu::rootfs::{AgentImageConfig, ExtraFile};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

/// An image of `version` with the agent (no server) and `files`.
fn agent_image(
    lab: &Lab,
    keys: &SigningSetup,
    version: &str,
    files: Vec<ExtraFile>,
) -> Result<PathBuf> {
    twinroot_e2e::agent_image(lab, keys, &AgentImageConfig::offline(), version, files)
}

/// A disk with `a` good in slot A and `b` staged in slot B (priority 2, one try).
fn staged_disk(lab: &Lab, a: &Path, b: &Path) -> Result<HostDisk> {
    let disk = lab.kit.disk("host")?;
    disk.write_slot(SlotName::A, a)?;
    disk.write_slot(SlotName::B, b)?;
    let (new, old) = staged(GOOD, 1);
    disk.set_attrs(SlotName::A, old)?;
    disk.set_attrs(SlotName::B, new)?;
    Ok(disk)
}

/// Polls the disk's slot table (the guest writes it through to the image file when it fsyncs)
/// until `want` holds.
fn wait_for_slots(
    disk: &HostDisk,
    what: &str,
    want: impl Fn(&[SlotAttrs; 2]) -> bool,
) -> Result<[SlotAttrs; 2]> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        // A read racing the guest's two-copy GPT write falls back to the backup table; retry
        // on a transient error.
        if let Ok(slots) = disk.slots() {
            let attrs = slots.map(|s| s.attrs);
            if want(&attrs) {
                return Ok(attrs);
            }
            if Instant::now() >= deadline {
                bail!("{what}: slot table still a: {}, b: {}", attrs[0], attrs[1]);
            }
        } else if Instant::now() >= deadline {
            bail!("{what}: slot table of {} unreadable", disk.path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agent_marks_a_healthy_staged_slot_good() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let v1 = agent_image(&lab, &keys, "1.0.0", vec![])?;
    let v2 = agent_image(
        &lab,
        &keys,
        "2.0.0",
        vec![ExtraFile::required_check("10-ok", "echo v2 is fine")],
    )?;
    let disk = staged_disk(&lab, &v1, &v2)?;

    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot-boot: slot b tries 1 -> 0 written", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
    let slots = wait_for_slots(&disk, "waiting for the agent to mark slot b good", |s| {
        s[1].successful
    })?;
    eprintln!(
        "slot b marked good {:.1} s after QEMU start",
        host.uptime().as_secs_f64()
    );
    assert_eq!(
        slots,
        [
            GOOD,
            SlotAttrs {
                priority: 2,
                tries: 0,
                successful: true
            }
        ]
    );
    assert_eq!(host.count("twinroot-boot: booting slot"), 1, "no reboot");
    host.stop()?;
    Ok(())
}

#[test]
fn agent_reverts_a_staged_slot_whose_required_check_fails() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let v1 = agent_image(&lab, &keys, "1.0.0", vec![])?;
    let v3 = agent_image(
        &lab,
        &keys,
        "3.0.0",
        vec![ExtraFile::required_check(
            "10-fail",
            "echo v3 health check failing on purpose; exit 1",
        )],
    )?;
    let disk = staged_disk(&lab, &v1, &v3)?;

    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 3.0.0 slot b", BOOT_TIMEOUT)?;
    // The agent fails the check, marks b bad, makes a the next boot and reboots by itself.
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    eprintln!(
        "back on slot a {:.1} s after QEMU start",
        started.elapsed().as_secs_f64()
    );
    let slots = wait_for_slots(&disk, "slot table after the revert", |s| {
        s[1].priority == 0 && s[0].successful
    })?;
    assert_eq!(slots[1], SlotAttrs::UNBOOTABLE);
    assert!(
        slots[0].is_bootable(),
        "slot a stays bootable: {}",
        slots[0]
    );
    host.stop()?;
    Ok(())
}

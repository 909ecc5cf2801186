//! Boot side of the A/B scheme under real QEMU (TCG): the initramfs boot selector reads the GPT
//! slot table, consumes a try on disk before booting a staged slot, falls back after a kernel
//! panic, and halts when nothing is bootable. No agent involved: these are the slot-level rules.

use std::time::Instant;

use anyhow::Result;
use twinroot_e2e::{BOOT_TIMEOUT, Lab};
use twinroot_format::slot::{SlotAttrs, SlotName, staged};
use twinroot_qemu::boot::NO_SLOT_LINE;
use twinroot_qemu::harness::{GOOD, Host, SigningSetup};
use twinroot_qemu::rootfs::{InitBehaviour, PANIC_LINE};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");

fn attrs(priority: u8, tries: u8, successful: bool) -> SlotAttrs {
    SlotAttrs {
        priority,
        tries,
        successful,
    }
}

#[test]
fn boots_the_good_slot_a_written_from_a_signed_bundle() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let mut spec = lab.kit.rootfs("1.0.0");
    spec.keyring = Some(std::fs::read(&keys.keyring)?);
    let v1 = lab.kit.image("v1", &spec)?;
    let bundle = lab.path().join("v1.bundle");
    keys.bundle(&v1, "1.0.0", &bundle)?;
    let disk = lab.kit.disk("host")?;
    let version = disk.write_slot_from_bundle(SlotName::A, &bundle, &keys.keyring)?;
    assert_eq!(version.to_string(), "1.0.0");
    disk.set_attrs(SlotName::A, GOOD)?;

    let config = lab.kit.host("host", &disk);
    let log = config.log.clone();
    let mut host = Host::start(config)?;
    host.wait_for(
        "twinroot-boot: /dev/vda: a priority=1 tries=0 successful=1, b priority=0 tries=0 successful=0",
        BOOT_TIMEOUT,
    )?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for(
        "twinroot-boot: state partition /dev/vda9 mounted on /state",
        BOOT_TIMEOUT,
    )?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    eprintln!("boot to version line: {:.1} s", host.uptime().as_secs_f64());
    host.stop()?;

    // A successful slot boots without consuming anything.
    let slots = disk.slots()?;
    assert_eq!(slots[0].attrs, GOOD);
    assert_eq!(slots[1].attrs, SlotAttrs::UNBOOTABLE);
    let logged = std::fs::read_to_string(&log)?;
    assert!(
        logged.contains("twinroot: booted version 1.0.0 slot a"),
        "console log {} lacks the version line",
        log.display()
    );
    Ok(())
}

#[test]
fn staged_slot_that_panics_falls_back_to_a() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let v1 = lab.kit.image("v1", &lab.kit.rootfs("1.0.0"))?;
    let mut broken = lab.kit.rootfs("4.0.0");
    broken.init = InitBehaviour::Panic;
    broken.include_kernel = false;
    let v4 = lab.kit.image("v4", &broken)?;
    let disk = lab.kit.disk("host")?;
    disk.write_slot(SlotName::A, &v1)?;
    disk.write_slot(SlotName::B, &v4)?;
    let (b, a) = staged(GOOD, 1);
    disk.set_attrs(SlotName::A, a)?;
    disk.set_attrs(SlotName::B, b)?;

    let started = Instant::now();
    let mut host = Host::start(lab.kit.host("host", &disk))?;
    // First boot: B has the higher priority; its only try is written to disk before it boots.
    host.wait_for(
        "twinroot-boot: /dev/vda: a priority=1 tries=0 successful=1, b priority=2 tries=1 successful=0",
        BOOT_TIMEOUT,
    )?;
    host.wait_for("twinroot-boot: slot b tries 1 -> 0 written", BOOT_TIMEOUT)?;
    host.wait_for("twinroot-boot: booting slot b from /dev/vda4", BOOT_TIMEOUT)?;
    host.wait_for(PANIC_LINE, BOOT_TIMEOUT)?;
    host.wait_for("Kernel panic", BOOT_TIMEOUT)?;
    let panicked = started.elapsed();
    // The kernel reboots by itself (panic=N); B has no tries left and never succeeded, so A boots.
    host.wait_for(
        "twinroot-boot: /dev/vda: a priority=1 tries=0 successful=1, b priority=2 tries=0 successful=0",
        BOOT_TIMEOUT,
    )?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    eprintln!(
        "panic after {:.1} s, back on slot a after {:.1} s",
        panicked.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    host.stop()?;

    assert_eq!(host_slots(&disk)?, [GOOD, attrs(2, 0, false)]);
    Ok(())
}

#[test]
fn unconfirmed_staged_slot_boots_once_then_reverts() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let v1 = lab.kit.image("v1", &lab.kit.rootfs("1.0.0"))?;
    let mut v2_spec = lab.kit.rootfs("2.0.0");
    v2_spec.include_kernel = false;
    let v2 = lab.kit.image("v2", &v2_spec)?;
    let disk = lab.kit.disk("host")?;
    disk.write_slot(SlotName::A, &v1)?;
    disk.write_slot(SlotName::B, &v2)?;
    let (b, a) = staged(GOOD, 1);
    disk.set_attrs(SlotName::A, a)?;
    disk.set_attrs(SlotName::B, b)?;

    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
    // Power cut before anything marked B good: the try is already spent on disk.
    host.power_cut()?;
    assert_eq!(host_slots(&disk)?, [GOOD, attrs(2, 0, false)]);

    let mut host = Host::start(lab.kit.host("host-again", &disk))?;
    host.wait_for("twinroot-boot: booting slot a from /dev/vda3", BOOT_TIMEOUT)?;
    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    host.stop()?;
    Ok(())
}

#[test]
fn no_bootable_slot_halts() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let v1 = lab.kit.image("v1", &lab.kit.rootfs("1.0.0"))?;
    let disk = lab.kit.disk("host")?;
    disk.write_slot(SlotName::A, &v1)?;
    // A has an image but no priority; B is empty; a slot with tries spent is not bootable either.
    disk.set_attrs(SlotName::A, attrs(0, 0, true))?;
    disk.set_attrs(SlotName::B, attrs(3, 0, false))?;

    let mut host = Host::start(lab.kit.host("host", &disk))?;
    host.wait_for(NO_SLOT_LINE, BOOT_TIMEOUT)?;
    // The selector powers the machine off: QEMU exits by itself.
    let status = host.wait_exit(BOOT_TIMEOUT)?;
    assert!(status.success(), "qemu exit status {status}");
    assert_eq!(host.count("twinroot-boot: booting slot"), 0);
    assert_eq!(host_slots(&disk)?, [attrs(0, 0, true), attrs(3, 0, false)]);
    Ok(())
}

fn host_slots(disk: &twinroot_qemu::harness::HostDisk) -> Result<[SlotAttrs; 2]> {
    Ok(disk.slots()?.map(|s| s.attrs))
}

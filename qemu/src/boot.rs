//! The boot selector: `/init` of the twinroot initramfs (binary `twinroot-boot`).
//!
//! 1. mounts /proc, /sys and /dev, loads the kernel modules listed in `/etc/twinroot/modules`;
//! 2. opens the disk (`/dev/vda`, or `twinroot.disk=` on the kernel command line) and reads the
//!    A/B slot table with [`twinroot_format::gpt`];
//! 3. picks a slot with [`twinroot_format::slot::choose_boot`] (the same code the agent uses) and,
//!    when the choice consumes a try, writes `tries - 1` to disk (fsync'd) *before* booting it;
//! 4. mounts the slot read-only as the new root, a tmpfs on its /run with
//!    `/run/twinroot/booted-slot` (`a` or `b`) and the agent drop-in
//!    `/run/twinroot/agent.d/10-booted-slot.toml` (`[agent] booted_slot = "a"`), and the STATE partition on its /state;
//! 5. moves /dev, /proc and /sys into the new root and switches to it, running `/sbin/init` (or
//!    `twinroot.init=`) with `TWINROOT_SLOT` in its environment.
//!
//! With no bootable slot it prints [`NO_SLOT_LINE`] and powers off. A failure after a try was
//! consumed reboots, so a slot that cannot even be mounted runs out of tries like one that panics.
//!
//! Every console line starts with `twinroot-boot: ` so tests can wait for them.

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::mount::{MsFlags, mount};
use twinroot_format::gpt::SlotDisk;
use twinroot_format::slot::{SlotName, SlotState, after_boot_attempt, choose_boot};

use crate::initramfs::MODULE_LIST;

/// Printed (after the slot table) when neither slot may boot; the selector then powers off.
pub const NO_SLOT_LINE: &str = "twinroot-boot: no bootable slot, halting";
/// Prefix of the line naming the chosen slot: `twinroot-boot: booting slot a from /dev/vda3`.
pub const BOOTING_PREFIX: &str = "twinroot-boot: booting slot ";
/// The file, in the new root's /run, that tells userspace which slot booted (`a` or `b`).
pub const BOOTED_SLOT_FILE: &str = "run/twinroot/booted-slot";
/// Agent configuration drop-in, in the new root's /run, that sets `agent.booted_slot`.
pub const AGENT_DROPIN: &str = "run/twinroot/agent.d/10-booted-slot.toml";
/// Where the STATE partition is mounted in the new root.
pub const STATE_MOUNT: &str = "state";

const NEW_ROOT: &str = "/newroot";

/// Options read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// `twinroot.disk=` (default `/dev/vda`).
    pub disk: PathBuf,
    /// `twinroot.init=` (default `/sbin/init`).
    pub init: String,
    /// `twinroot.device_timeout=SECONDS` (default 20): how long to wait for the disk to appear.
    pub device_timeout: Duration,
}

impl BootOptions {
    /// Parses `/proc/cmdline`; unknown words are ignored.
    pub fn from_cmdline(cmdline: &str) -> BootOptions {
        let mut opts = BootOptions {
            disk: PathBuf::from("/dev/vda"),
            init: "/sbin/init".to_string(),
            device_timeout: Duration::from_secs(20),
        };
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("twinroot.disk=") {
                opts.disk = PathBuf::from(v);
            } else if let Some(v) = word.strip_prefix("twinroot.init=") {
                opts.init = v.to_string();
            } else if let Some(v) = word.strip_prefix("twinroot.device_timeout=")
                && let Ok(secs) = v.parse()
            {
                opts.device_timeout = Duration::from_secs(secs);
            }
        }
        opts
    }
}

/// The console line describing both slots, e.g.
/// `twinroot-boot: /dev/vda: a priority=1 tries=0 successful=1, b priority=2 tries=1 successful=0`.
pub fn describe_slots(disk: &Path, slots: &[SlotState; 2]) -> String {
    let mut line = format!("twinroot-boot: {}:", disk.display());
    for (i, s) in slots.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        let _ = write!(line, "{sep}{} {}", s.name, s.attrs);
    }
    line
}

/// The partition device of partition `number` on `disk` (`/dev/vda` 3 -> `/dev/vda3`,
/// `/dev/nvme0n1` 3 -> `/dev/nvme0n1p3`).
pub fn partition_device(disk: &Path, number: u32) -> PathBuf {
    let s = disk.display().to_string();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{number}"))
    } else {
        PathBuf::from(format!("{s}{number}"))
    }
}

/// Among `(partition number, start sector)` pairs, the partition starting at `offset` bytes.
pub fn partition_at(partitions: &[(u32, u64)], offset: u64) -> Option<u32> {
    partitions
        .iter()
        .find(|(_, start)| start * 512 == offset)
        .map(|(n, _)| *n)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `twinroot-boot`: never returns (switches root, reboots or powers off).
pub fn main() -> ! {
    if std::process::id() != 1 {
        eprintln!("twinroot-boot is the initramfs /init and must run as PID 1");
        std::process::exit(2);
    }
    let failure = match run() {
        Ok(never) => match never {},
        Err(f) => f,
    };
    match failure {
        Failure::BeforeChoice(e) => {
            say(&format!("twinroot-boot: error: {e:#}"));
            say("twinroot-boot: cannot choose a slot, halting");
            power_off();
        }
        Failure::NoSlot => {
            say(NO_SLOT_LINE);
            power_off();
        }
        Failure::AfterChoice(slot, e) => {
            say(&format!("twinroot-boot: error booting slot {slot}: {e:#}"));
            say("twinroot-boot: rebooting");
            nix::unistd::sync();
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

enum Failure {
    BeforeChoice(anyhow::Error),
    NoSlot,
    AfterChoice(SlotName, anyhow::Error),
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn run() -> Result<std::convert::Infallible, Failure> {
    let before = Failure::BeforeChoice;
    mount_api_filesystems().map_err(before)?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let opts = BootOptions::from_cmdline(&cmdline);
    let loaded = load_modules(Path::new("/").join(MODULE_LIST).as_path()).map_err(before)?;
    say(&format!("twinroot-boot: loaded {loaded} kernel modules"));

    wait_for(&opts.disk, opts.device_timeout).map_err(before)?;
    let mut disk = SlotDisk::open_rw(&opts.disk)
        .with_context(|| format!("reading the slot table of {}", opts.disk.display()))
        .map_err(before)?;
    let slots = disk.slots();
    say(&describe_slots(&opts.disk, &slots));
    let choice = choose_boot(&slots).ok_or(Failure::NoSlot)?;
    let slot = choice.slot;
    let after = |e| Failure::AfterChoice(slot, e);
    if choice.consume_try {
        let old = disk.attrs(slot);
        let new = after_boot_attempt(old);
        disk.set_attrs(slot, new)
            .with_context(|| format!("writing slot {slot} tries to {}", opts.disk.display()))
            .map_err(after)?;
        say(&format!(
            "twinroot-boot: slot {slot} tries {} -> {} written",
            old.tries, new.tries
        ));
    }
    let device = partition_device(&opts.disk, disk.partition_number(slot));
    say(&format!("{BOOTING_PREFIX}{slot} from {}", device.display()));
    wait_for(&device, opts.device_timeout).map_err(after)?;
    mount_root(&device).map_err(after)?;
    prepare_run(slot).map_err(after)?;
    if let Some(extent) = disk.state_extent() {
        mount_state(&opts.disk, extent.offset);
    }
    drop(disk);
    switch_root(&opts.init, slot).map_err(after)
}

fn mount_api_filesystems() -> Result<()> {
    let none: Option<&str> = None;
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
        match mount(Some(fstype), target, Some(fstype), MsFlags::empty(), none) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(anyhow!("mounting {fstype} on {target}: {e}")),
        }
    }
    Ok(())
}

/// Loads the modules listed in `list` (first line `kver=KVER`, then paths relative to
/// `/lib/modules/KVER`), in order. Already loaded modules are fine.
fn load_modules(list: &Path) -> Result<usize> {
    let text = fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    let mut lines = text.lines();
    let kver = lines
        .next()
        .and_then(|l| l.strip_prefix("kver="))
        .ok_or_else(|| anyhow!("{}: first line must be kver=VERSION", list.display()))?;
    let running = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !running.trim().is_empty() && running.trim() != kver {
        return Err(anyhow!(
            "initramfs modules are for kernel {kver} but the running kernel is {}",
            running.trim()
        ));
    }
    let mut loaded = 0;
    for rel in lines.filter(|l| !l.trim().is_empty()) {
        let path = Path::new("/lib/modules").join(kver).join(rel.trim());
        let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(anyhow!("loading kernel module {}: {e}", path.display())),
        }
    }
    Ok(loaded)
}

/// Waits until `path` exists (devtmpfs creates device nodes as drivers probe).
fn wait_for(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "{} did not appear within {} s",
                path.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn mount_root(device: &Path) -> Result<()> {
    fs::create_dir_all(NEW_ROOT).context("creating /newroot")?;
    let none: Option<&str> = None;
    let mut errors = Vec::new();
    for fstype in ["squashfs", "erofs"] {
        match mount(
            Some(device),
            NEW_ROOT,
            Some(fstype),
            MsFlags::MS_RDONLY,
            none,
        ) {
            Ok(()) => return Ok(()),
            Err(e) => errors.push(format!("{fstype}: {e}")),
        }
    }
    Err(anyhow!(
        "cannot mount {} read-only as root ({})",
        device.display(),
        errors.join(", ")
    ))
}

fn prepare_run(slot: SlotName) -> Result<()> {
    let run = Path::new(NEW_ROOT).join("run");
    mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| anyhow!("mounting a tmpfs on {}: {e}", run.display()))?;
    let file = Path::new(NEW_ROOT).join(BOOTED_SLOT_FILE);
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&file, format!("{slot}\n")).with_context(|| format!("writing {}", file.display()))?;
    let dropin = Path::new(NEW_ROOT).join(AGENT_DROPIN);
    if let Some(dir) = dropin.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&dropin, agent_dropin(slot)).with_context(|| format!("writing {}", dropin.display()))
}

/// The update-agent configuration fragment naming the booted slot (the agent reads drop-ins
/// from /run/twinroot/agent.d last, so this wins over the image's own config).
pub fn agent_dropin(slot: SlotName) -> String {
    format!("# written by twinroot-boot at boot\n[agent]\nbooted_slot = \"{slot}\"\n")
}

/// Mounts the STATE partition (ext4) on the new root's /state. A failure is reported, not fatal:
/// the host still boots and its agent reports the missing state.
fn mount_state(disk: &Path, offset: u64) {
    let target = Path::new(NEW_ROOT).join(STATE_MOUNT);
    let result = (|| -> Result<PathBuf> {
        let partitions = sysfs_partitions(disk)?;
        let number = partition_at(&partitions, offset)
            .ok_or_else(|| anyhow!("no partition of {} starts at byte {offset}", disk.display()))?;
        let device = partition_device(disk, number);
        wait_for(&device, Duration::from_secs(5))?;
        if !target.is_dir() {
            return Err(anyhow!("the root image has no /{STATE_MOUNT} directory"));
        }
        mount(
            Some(&device),
            &target,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| anyhow!("mounting {} (ext4): {e}", device.display()))?;
        Ok(device)
    })();
    match result {
        Ok(device) => say(&format!(
            "twinroot-boot: state partition {} mounted on /{STATE_MOUNT}",
            device.display()
        )),
        Err(e) => say(&format!("twinroot-boot: warning: state partition: {e:#}")),
    }
}

/// `(partition number, start sector)` of `disk`'s partitions, from /sys/class/block.
fn sysfs_partitions(disk: &Path) -> Result<Vec<(u32, u64)>> {
    let name = disk
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad disk path {}", disk.display()))?;
    let dir = Path::new("/sys/class/block").join(name);
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let (Ok(partition), Ok(start)) = (
            fs::read_to_string(path.join("partition")),
            fs::read_to_string(path.join("start")),
        ) else {
            continue;
        };
        if let (Ok(n), Ok(s)) = (partition.trim().parse(), start.trim().parse()) {
            out.push((n, s));
        }
    }
    Ok(out)
}

fn switch_root(init: &str, slot: SlotName) -> Result<std::convert::Infallible> {
    let new_root = Path::new(NEW_ROOT);
    let init_path = new_root.join(init.trim_start_matches('/'));
    if fs::symlink_metadata(&init_path).is_err() {
        return Err(anyhow!("the root image has no {init}"));
    }
    for api in ["dev", "proc", "sys"] {
        let target = new_root.join(api);
        if target.is_dir() {
            mount(
                Some(Path::new("/").join(api).as_path()),
                &target,
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(|e| anyhow!("moving /{api} to {}: {e}", target.display()))?;
        }
    }
    nix::unistd::chdir(new_root).context("chdir /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| anyhow!("moving /newroot to /: {e}"))?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    say(&format!(
        "twinroot-boot: switching root to slot {slot}, running {init}"
    ));
    let prog = CString::new(init).context("init path")?;
    let env = [
        CString::new(format!("TWINROOT_SLOT={slot}")).expect("no NUL"),
        CString::new("PATH=/usr/sbin:/usr/bin:/sbin:/bin").expect("no NUL"),
        CString::new("HOME=/").expect("no NUL"),
        CString::new("TERM=linux").expect("no NUL"),
    ];
    nix::unistd::execve(&prog, std::slice::from_ref(&prog), &env)
        .map_err(|e| anyhow!("running {init}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinroot_format::slot::SlotAttrs;

    #[test]
    fn cmdline_options_and_defaults() {
        let d = BootOptions::from_cmdline("console=ttyS0 panic=5");
        assert_eq!(d.disk, Path::new("/dev/vda"));
        assert_eq!(d.init, "/sbin/init");
        let o = BootOptions::from_cmdline(
            "console=ttyS0 twinroot.disk=/dev/sda twinroot.init=/bin/sh twinroot.device_timeout=3",
        );
        assert_eq!(o.disk, Path::new("/dev/sda"));
        assert_eq!(o.init, "/bin/sh");
        assert_eq!(o.device_timeout, Duration::from_secs(3));
    }

    #[test]
    fn partition_devices() {
        assert_eq!(
            partition_device(Path::new("/dev/vda"), 3),
            Path::new("/dev/vda3")
        );
        assert_eq!(
            partition_device(Path::new("/dev/nvme0n1"), 9),
            Path::new("/dev/nvme0n1p9")
        );
    }

    #[test]
    fn partition_found_by_start_offset() {
        let parts = [(3, 2048), (4, 133120), (9, 264192)];
        assert_eq!(partition_at(&parts, 264192 * 512), Some(9));
        assert_eq!(partition_at(&parts, 1000), None);
    }

    #[test]
    fn slot_line_names_both_slots() {
        let a = SlotState {
            name: SlotName::A,
            attrs: SlotAttrs {
                priority: 1,
                tries: 0,
                successful: true,
            },
        };
        let b = SlotState {
            name: SlotName::B,
            attrs: SlotAttrs {
                priority: 2,
                tries: 1,
                successful: false,
            },
        };
        assert_eq!(
            describe_slots(Path::new("/dev/vda"), &[a, b]),
            "twinroot-boot: /dev/vda: a priority=1 tries=0 successful=1, \
             b priority=2 tries=1 successful=0"
        );
    }
}

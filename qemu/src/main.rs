//! `twinroot-qemu`: build initramfs, root image trees and disks, and run a host under QEMU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use twinroot_format::slot::{SlotName, staged};
use twinroot_qemu::harness::{
    GOOD, Host, HostConfig, HostDisk, TEST_LAYOUT, build_root_image, pvh_kernel,
};
use twinroot_qemu::initramfs::{InitramfsSpec, Kernel, build_initramfs};
use twinroot_qemu::modules::GUEST_MODULES;
use twinroot_qemu::rootfs::{AgentSpec, InitBehaviour, RootfsSpec, write_rootfs};

#[derive(Parser)]
#[command(version, about = "twinroot QEMU boot tooling")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the initramfs (boot selector as /init, busybox, kernel modules).
    Initramfs {
        /// The twinroot-boot binary (default: next to this program).
        #[arg(long)]
        selector: Option<PathBuf>,
        /// Kernel version (default: newest in /boot with modules).
        #[arg(long)]
        kernel_version: Option<String>,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a root image tree (then build it with `image-tool build` or `--image`).
    Rootfs {
        #[arg(long)]
        version: String,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Also build the image at this path (as `image-tool build` does).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        kernel_version: Option<String>,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Make an image whose init exits, so the kernel panics (a broken release).
        #[arg(long)]
        panic: bool,
        /// The update-agent binary to ship.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Agent configuration TOML file (with --agent).
        #[arg(long, requires = "agent")]
        agent_config: Option<PathBuf>,
        /// Arguments for the agent (with --agent).
        #[arg(long, requires = "agent", allow_hyphen_values = true)]
        agent_arg: Vec<String>,
        /// The trusted keyring file.
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
    /// Create a disk: image in slot A marked good; optionally an image staged in slot B.
    Disk {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        slot_a: PathBuf,
        /// Image staged in slot B (priority above A, one try, not successful).
        #[arg(long)]
        slot_b: Option<PathBuf>,
    },
    /// Boot a disk under QEMU (TCG), console on stdout, until the guest powers off.
    Run {
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        /// Kernel image (default: the newest installed, booted as its PVH vmlinux when possible).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Console log file.
        #[arg(long, default_value = "console.log")]
        log: PathBuf,
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// Stop as soon as the console prints this text, and print how long it took.
        #[arg(long)]
        until: Option<String>,
        /// Boot the compressed bzImage even when the PVH vmlinux can be extracted.
        #[arg(long)]
        bzimage: bool,
        /// Don't copy the console to stdout (it still goes to --log).
        #[arg(long)]
        quiet: bool,
    },
}

fn kernel(version: Option<&str>) -> Result<Kernel> {
    match version {
        Some(v) => Kernel::installed(v),
        None => Kernel::find_installed(),
    }
}

fn initramfs(
    selector: Option<PathBuf>,
    kernel_version: Option<String>,
    busybox: PathBuf,
    out: &Path,
) -> Result<()> {
    let selector = match selector {
        Some(s) => s,
        None => std::env::current_exe()?
            .parent()
            .context("locating this program's directory")?
            .join("twinroot-boot"),
    };
    let spec = InitramfsSpec {
        selector,
        busybox,
        kernel: kernel(kernel_version.as_deref())?,
        modules: GUEST_MODULES.iter().map(|s| s.to_string()).collect(),
    };
    build_initramfs(&spec, out)?;
    println!(
        "initramfs {} for kernel {}",
        out.display(),
        spec.kernel.version
    );
    Ok(())
}

struct RootfsArgs {
    version: String,
    out: PathBuf,
    image: Option<PathBuf>,
    kernel_version: Option<String>,
    busybox: PathBuf,
    panic: bool,
    agent: Option<PathBuf>,
    agent_config: Option<PathBuf>,
    agent_args: Vec<String>,
    keyring: Option<PathBuf>,
}

fn rootfs(a: RootfsArgs) -> Result<()> {
    let mut spec = RootfsSpec::new(
        &a.version,
        &a.busybox,
        &kernel(a.kernel_version.as_deref())?,
    );
    if a.panic {
        spec.init = InitBehaviour::Panic;
    }
    if let Some(binary) = a.agent {
        let config = match a.agent_config {
            Some(p) => std::fs::read_to_string(&p)
                .with_context(|| format!("reading agent config {}", p.display()))?,
            None => String::new(),
        };
        spec.agent = Some(AgentSpec {
            binary,
            args: a.agent_args,
            config,
        });
    }
    if let Some(k) = a.keyring {
        spec.keyring =
            Some(std::fs::read(&k).with_context(|| format!("reading keyring {}", k.display()))?);
    }
    write_rootfs(&spec, &a.out)?;
    println!("root tree {} (version {})", a.out.display(), a.version);
    if let Some(image) = a.image {
        build_root_image(&a.out, &a.version, &image)?;
        println!("root image {}", image.display());
    }
    Ok(())
}

fn disk(out: &Path, slot_a: &Path, slot_b: Option<&Path>) -> Result<()> {
    let disk = HostDisk::create(out, &TEST_LAYOUT)?;
    disk.write_slot(SlotName::A, slot_a)?;
    disk.set_attrs(SlotName::A, GOOD)?;
    if let Some(b) = slot_b {
        disk.write_slot(SlotName::B, b)?;
        let (new, other) = staged(GOOD, 1);
        disk.set_attrs(SlotName::A, other)?;
        disk.set_attrs(SlotName::B, new)?;
    }
    for s in disk.slots()? {
        println!("slot {}: {}", s.name, s.attrs);
    }
    Ok(())
}

struct RunArgs {
    disk: PathBuf,
    initrd: PathBuf,
    kernel: Option<PathBuf>,
    log: PathBuf,
    memory_mib: u32,
    timeout: Duration,
    until: Option<String>,
    bzimage: bool,
    quiet: bool,
}

fn run(a: RunArgs) -> Result<()> {
    let kernel_image = match a.kernel {
        Some(k) => k,
        None if a.bzimage => kernel(None)?.image,
        None => {
            let k = kernel(None)?;
            let cache = std::env::temp_dir().join("twinroot-kernel-cache");
            pvh_kernel(&k, &cache)?.unwrap_or(k.image)
        }
    };
    let mut config = HostConfig::new("host", &a.disk, &kernel_image, &a.initrd, &a.log);
    config.memory_mib = a.memory_mib;
    config.echo = !a.quiet;
    let mut host = Host::start(config)?;
    if let Some(text) = a.until {
        let line = host.wait_for(&text, a.timeout)?;
        let secs = host.uptime().as_secs_f64();
        host.stop()?;
        println!("reached after {secs:.2} s: {line}");
        return Ok(());
    }
    let status = host.wait_exit(a.timeout)?;
    println!("qemu exited: {status}");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Initramfs {
            selector,
            kernel_version,
            busybox,
            out,
        } => initramfs(selector, kernel_version, busybox, &out),
        Cmd::Rootfs {
            version,
            out,
            image,
            kernel_version,
            busybox,
            panic,
            agent,
            agent_config,
            agent_arg,
            keyring,
        } => rootfs(RootfsArgs {
            version,
            out,
            image,
            kernel_version,
            busybox,
            panic,
            agent,
            agent_config,
            agent_args: agent_arg,
            keyring,
        }),
        Cmd::Disk {
            out,
            slot_a,
            slot_b,
        } => disk(&out, &slot_a, slot_b.as_deref()),
        Cmd::Run {
            disk,
            initrd,
            kernel,
            log,
            memory_mib,
            timeout_secs,
            until,
            bzimage,
            quiet,
        } => run(RunArgs {
            disk,
            initrd,
            kernel,
            log,
            memory_mib,
            timeout: Duration::from_secs(timeout_secs),
            until,
            bzimage,
            quiet,
        }),
    }
}

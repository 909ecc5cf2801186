//! Builds the twinroot initramfs: the boot selector as `/init`, the shared libraries it needs,
//! static busybox (for a rescue shell), and the kernel modules the guest needs, with their
//! dependencies, plus `/etc/twinroot/modules`, the load order the selector follows.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cpio::CpioWriter;
use crate::libs::{copy_stripped, shared_libraries};
use crate::modules::ModuleIndex;

/// Where, inside the initramfs, the selector finds its module load order (one path per line,
/// relative to `/lib/modules/KVER`), and the kernel version line `kver=KVER` first.
pub const MODULE_LIST: &str = "etc/twinroot/modules";

/// An installed kernel: its image and its module tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub version: String,
    pub image: PathBuf,
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// The kernel `VERSION` installed as `/boot/vmlinuz-VERSION` with `/lib/modules/VERSION`.
    pub fn installed(version: &str) -> Result<Kernel> {
        let kernel = Kernel {
            version: version.to_string(),
            image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
            modules_dir: PathBuf::from(format!("/lib/modules/{version}")),
        };
        if !kernel.image.is_file() {
            bail!(
                "kernel image {} not found (install linux-image-amd64)",
                kernel.image.display()
            );
        }
        if !kernel.modules_dir.join("modules.dep").is_file() {
            bail!(
                "kernel modules {} not found (install linux-image-amd64)",
                kernel.modules_dir.display()
            );
        }
        Ok(kernel)
    }

    /// The newest kernel in /boot that has its modules installed.
    pub fn find_installed() -> Result<Kernel> {
        let mut versions: Vec<String> = fs::read_dir("/boot")
            .context("reading /boot")?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_string)
            })
            .filter(|v| Path::new(&format!("/lib/modules/{v}/modules.dep")).is_file())
            .collect();
        versions.sort();
        match versions.pop() {
            Some(v) => Kernel::installed(&v),
            None => bail!(
                "no kernel with modules found in /boot and /lib/modules (install linux-image-amd64)"
            ),
        }
    }
}

/// What goes into an initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The boot selector binary (`twinroot-boot`); becomes `/init`.
    pub selector: PathBuf,
    /// A static busybox; becomes `/bin/busybox` with applet links.
    pub busybox: PathBuf,
    pub kernel: Kernel,
    /// Module names to load (their dependencies are added).
    pub modules: Vec<String>,
}

/// Writes the initramfs described by `spec` to `out` (uncompressed newc cpio).
pub fn build_initramfs(spec: &InitramfsSpec, out: &Path) -> Result<()> {
    let file =
        fs::File::create(out).with_context(|| format!("creating initramfs {}", out.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    let index = ModuleIndex::load(&spec.kernel.modules_dir)?;
    let names: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let order = index.load_order(&names)?;

    let mut dirs = DirSet::default();
    for dir in [
        "dev", "proc", "sys", "run", "tmp", "newroot", "bin", "sbin", "etc",
    ] {
        dirs.ensure(&mut cpio, dir)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;

    let stripped = out.with_extension("init.tmp");
    copy_stripped(&spec.selector, &stripped)?;
    let init = read(&stripped);
    let _ = fs::remove_file(&stripped);
    cpio.file("init", 0o755, &init?)?;
    for lib in shared_libraries(&spec.selector)? {
        let data = read(&lib)?;
        let path = lib.to_string_lossy().trim_start_matches('/').to_string();
        dirs.ensure_parent(&mut cpio, &path)?;
        cpio.file(&path, 0o755, &data)?;
    }

    cpio.file("bin/busybox", 0o755, &read(&spec.busybox)?)?;
    for applet in [
        "sh", "ls", "cat", "mount", "umount", "dmesg", "poweroff", "reboot",
    ] {
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }

    let kver = &spec.kernel.version;
    let mut list = format!("kver={kver}\n");
    for rel in &order {
        let src = spec.kernel.modules_dir.join(rel);
        let path = format!("lib/modules/{kver}/{rel}");
        dirs.ensure_parent(&mut cpio, &path)?;
        cpio.file(&path, 0o644, &read(&src)?)?;
        list.push_str(rel);
        list.push('\n');
    }
    dirs.ensure_parent(&mut cpio, MODULE_LIST)?;
    cpio.file(MODULE_LIST, 0o644, list.as_bytes())?;
    cpio.finish()
        .with_context(|| format!("writing initramfs {}", out.display()))?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Applets of a busybox binary (`busybox --list`).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .collect())
}

/// Directories already written to an archive, so each parent is written once and first.
#[derive(Default)]
struct DirSet(std::collections::BTreeSet<String>);

impl DirSet {
    fn ensure<W: std::io::Write>(&mut self, cpio: &mut CpioWriter<W>, dir: &str) -> Result<()> {
        let mut prefix = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.0.insert(prefix.clone()) {
                cpio.dir(&prefix, 0o755)?;
            }
        }
        Ok(())
    }

    fn ensure_parent<W: std::io::Write>(
        &mut self,
        cpio: &mut CpioWriter<W>,
        path: &str,
    ) -> Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.ensure(cpio, parent),
            None => Ok(()),
        }
    }
}

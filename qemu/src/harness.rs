//! The QEMU harness: disks with A/B slots, hosts that boot them under TCG, their serial consoles.
//!
//! Test-side tooling: it uses system tools (`mkfs.ext4`, `qemu-system-x86_64`) and builds root images with
//! image-tools' library (`image-tool build`).
//!
//! A [`Host`] is one `qemu-system-x86_64` process: the shared kernel and initramfs
//! (`-kernel`/`-initrd`), one raw disk on virtio-blk, user-mode networking (the guest is 10.0.2.15
//! and reaches the build host's loopback services at 10.0.2.2), the serial console captured to a
//! log file and to memory. A kernel panic reboots the VM (`panic=N`, no `-no-reboot`), so boot
//! counting on the disk really happens; power-off ends the process.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use twinroot_format::gpt::{DiskLayout, SlotDisk, create_disk};
use twinroot_format::slot::{SlotAttrs, SlotName, SlotState};

use crate::initramfs::{InitramfsSpec, Kernel, build_initramfs};
use crate::modules::GUEST_MODULES;
use crate::rootfs::{RootfsSpec, write_rootfs};

/// Builds a read-only root image (a reproducible squashfs, with `image-tool build`'s library
/// function) of `version` from a directory written by [`crate::rootfs::write_rootfs`].
pub fn build_root_image(dir: &Path, version: &str, out: &Path) -> Result<u64> {
    let version = semver::Version::parse(version)
        .with_context(|| format!("root image version {version:?}"))?;
    image_tools::squashfs::build(&image_tools::squashfs::BuildOptions {
        rootfs: dir.to_path_buf(),
        version,
        out: out.to_path_buf(),
        mtime: 0,
    })
    .with_context(|| {
        format!(
            "building root image {} from {}",
            out.display(),
            dir.display()
        )
    })
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what}: {:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The uncompressed ELF kernel (`vmlinux`) inside a compressed bzImage, for QEMU's PVH direct
/// boot: it skips the in-guest decompression, which costs about 3 s per boot under TCG. Cached in
/// `cache_dir` (one file per kernel version and bzImage size). Returns `None` when the payload is
/// not an xz-compressed ELF (the caller then boots the bzImage).
pub fn pvh_kernel(kernel: &Kernel, cache_dir: &Path) -> Result<Option<PathBuf>> {
    let bz = std::fs::read(&kernel.image)
        .with_context(|| format!("reading kernel {}", kernel.image.display()))?;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let Some(offset) = bz.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
        return Ok(None);
    };
    let cached = cache_dir.join(format!("vmlinux-{}-{}", kernel.version, bz.len()));
    if cached.is_file() {
        return Ok(Some(cached));
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let tmp = cache_dir.join(format!(
        ".vmlinux-{}-{}.tmp{}",
        kernel.version,
        bz.len(),
        std::process::id()
    ));
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?)
        .stderr(Stdio::null())
        .spawn()
        .context("running xz (install xz-utils)")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // xz stops reading at the end of the stream; a broken pipe after that is expected.
    let _ = stdin.write_all(&bz[offset..]);
    drop(stdin);
    let status = child.wait().context("waiting for xz")?;
    let elf = std::fs::read(&tmp)
        .map(|d| d.len() > 4 && d.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if !status.success() || !elf {
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    std::fs::rename(&tmp, &cached)
        .with_context(|| format!("renaming {} to {}", tmp.display(), cached.display()))?;
    Ok(Some(cached))
}

/// A disk image file with the twinroot GPT layout.
#[derive(Debug, Clone)]
pub struct HostDisk {
    pub path: PathBuf,
}

/// Default sizes for test disks: room for a root image with kernel and modules, a small state.
pub const TEST_LAYOUT: DiskLayout = DiskLayout {
    slot_size: 64 << 20,
    state_size: 32 << 20,
};

impl HostDisk {
    /// Creates the disk at `path` (which must not exist): GPT with both slots unbootable and an
    /// ext4 STATE partition (formatted here, on the build host).
    pub fn create(path: &Path, layout: &DiskLayout) -> Result<HostDisk> {
        let disk = create_disk(path, layout)
            .with_context(|| format!("creating disk {}", path.display()))?;
        if let Some(state) = disk.state_extent() {
            drop(disk);
            run_tool(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "twinroot-state"])
                    .arg("-E")
                    .arg(format!("offset={}", state.offset))
                    .arg(path)
                    .arg(format!("{}k", state.len / 1024)),
                &format!("formatting the STATE partition of {}", path.display()),
            )?;
        }
        Ok(HostDisk {
            path: path.to_path_buf(),
        })
    }

    /// Copies a root image into `slot` (the whole image, then fsync).
    pub fn write_slot(&self, slot: SlotName, image: &Path) -> Result<()> {
        let disk = self.open()?;
        let mut writer = disk.slot_writer(slot, None)?;
        let mut src =
            File::open(image).with_context(|| format!("opening root image {}", image.display()))?;
        std::io::copy(&mut src, &mut writer).with_context(|| {
            format!(
                "writing {} into slot {slot} of {}",
                image.display(),
                self.path.display()
            )
        })?;
        writer.finish()?;
        Ok(())
    }

    /// Sets a slot's boot state.
    pub fn set_attrs(&self, slot: SlotName, attrs: SlotAttrs) -> Result<()> {
        let mut disk = SlotDisk::open_rw(&self.path)?;
        disk.set_attrs(slot, attrs)?;
        Ok(())
    }

    /// `len` bytes of `slot` from `offset` as the disk file holds them now (what a running
    /// guest has written back so far).
    pub fn read_slot(&self, slot: SlotName, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let extent = self.open()?.slot_extent(slot);
        if offset + len as u64 > extent.len {
            bail!(
                "{}: reading {len} bytes at {offset} of slot {slot}, which holds {} bytes",
                self.path.display(),
                extent.len
            );
        }
        let mut f = File::open(&self.path)
            .with_context(|| format!("opening disk {}", self.path.display()))?;
        f.seek(SeekFrom::Start(extent.offset + offset))?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf)
            .with_context(|| format!("reading slot {slot} of {}", self.path.display()))?;
        Ok(buf)
    }

    /// Both slots' boot state as on disk now.
    pub fn slots(&self) -> Result<[SlotState; 2]> {
        Ok(self.open()?.slots())
    }

    fn open(&self) -> Result<SlotDisk> {
        SlotDisk::open(&self.path).with_context(|| format!("opening disk {}", self.path.display()))
    }
}

/// A slot that booted and passed its checks (`successful`, priority 1).
pub const GOOD: SlotAttrs = SlotAttrs {
    priority: 1,
    tries: 0,
    successful: true,
};

/// How to run one host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Shown in errors and used for the log file name.
    pub name: String,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Console log file (appended to across reboots of this process).
    pub log: PathBuf,
    pub memory_mib: u32,
    /// Seconds the kernel waits after a panic before rebooting.
    pub panic_reboot_secs: u32,
    /// Extra kernel command line words.
    pub append: Vec<String>,
    /// Also copy the console to this process's stdout (interactive use).
    pub echo: bool,
}

impl HostConfig {
    pub fn new(name: &str, disk: &Path, kernel: &Path, initrd: &Path, log: &Path) -> Self {
        HostConfig {
            name: name.to_string(),
            disk: disk.to_path_buf(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            log: log.to_path_buf(),
            memory_mib: 256,
            panic_reboot_secs: 1,
            append: Vec::new(),
            echo: false,
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![
            "console=ttyS0".to_string(),
            format!("panic={}", self.panic_reboot_secs),
            "loglevel=4".to_string(),
        ];
        words.extend(self.append.iter().cloned());
        words.join(" ")
    }

    /// The full `qemu-system-x86_64` argument list.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-m".to_string(),
            self.memory_mib.to_string(),
            "-kernel".to_string(),
            self.kernel.display().to_string(),
            "-initrd".to_string(),
            self.initrd.display().to_string(),
            "-append".to_string(),
            self.cmdline(),
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=virtio,cache=writeback",
                self.disk.display().to_string().replace(',', ",,")
            ),
            "-netdev".to_string(),
            "user,id=net0".to_string(),
            "-device".to_string(),
            "virtio-net-pci,netdev=net0,romfile=".to_string(),
        ]);
        args
    }
}

/// The serial console of a host: everything it printed, and a cursor for [`Host::wait_for`].
struct Console {
    text: Mutex<ConsoleState>,
    changed: Condvar,
}

struct ConsoleState {
    text: String,
    closed: bool,
}

/// A running QEMU host.
pub struct Host {
    pub config: HostConfig,
    child: Child,
    console: Arc<Console>,
    reader: Option<std::thread::JoinHandle<()>>,
    cursor: usize,
    started: Instant,
}

impl Host {
    /// Starts QEMU for `config`.
    pub fn start(config: HostConfig) -> Result<Host> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log)
            .with_context(|| format!("opening console log {}", config.log.display()))?;
        let mut child = Command::new("qemu-system-x86_64")
            .args(config.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "host {}: cannot start qemu-system-x86_64 (install qemu-system-x86)",
                    config.name
                )
            })?;
        let console = Arc::new(Console {
            text: Mutex::new(ConsoleState {
                text: String::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let shared = console.clone();
        let echo = config.echo;
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log.write_all(&buf[..n]);
                let _ = log.flush();
                if echo {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                let mut state = shared.text.lock().expect("console lock");
                state.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                shared.changed.notify_all();
            }
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            let mut state = shared.text.lock().expect("console lock");
            if !err.trim().is_empty() {
                let line = format!("\n[qemu stderr] {}\n", err.trim());
                let _ = log.write_all(line.as_bytes());
                state.text.push_str(&line);
            }
            state.closed = true;
            shared.changed.notify_all();
        });
        Ok(Host {
            config,
            child,
            console,
            reader: Some(reader),
            cursor: 0,
            started: Instant::now(),
        })
    }

    /// Time since this QEMU process started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the console prints a line containing `needle` after the previous match, and
    /// returns that line. Fails when `timeout` passes or QEMU exits first; the error shows the
    /// console's last lines and names the log file.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.console.text.lock().expect("console lock");
        loop {
            if let Some(pos) = state.text[self.cursor..].find(needle) {
                let at = self.cursor + pos;
                let line_start = state.text[..at].rfind('\n').map_or(0, |i| i + 1);
                let Some(nl) = state.text[at..].find('\n') else {
                    // The line is not complete yet; wait for its end.
                    if state.closed {
                        self.cursor = state.text.len();
                        return Ok(state.text[line_start..].trim_end().to_string());
                    }
                    state = self.wait_more(state, deadline, needle, timeout)?;
                    continue;
                };
                let line_end = at + nl;
                self.cursor = line_end;
                return Ok(state.text[line_start..line_end].trim_end().to_string());
            }
            if state.closed {
                return Err(anyhow!(
                    "host {}: QEMU exited before the console printed {needle:?}; last lines:\n{}\n(full log: {})",
                    self.config.name,
                    tail(&state.text, 25),
                    self.config.log.display()
                ));
            }
            state = self.wait_more(state, deadline, needle, timeout)?;
        }
    }

    fn wait_more<'a>(
        &self,
        state: std::sync::MutexGuard<'a, ConsoleState>,
        deadline: Instant,
        needle: &str,
        timeout: Duration,
    ) -> Result<std::sync::MutexGuard<'a, ConsoleState>> {
        let now = Instant::now();
        if now >= deadline {
            return Err(anyhow!(
                "host {}: console did not print {needle:?} within {} s; last lines:\n{}\n(full log: {})",
                self.config.name,
                timeout.as_secs(),
                tail(&state.text, 25),
                self.config.log.display()
            ));
        }
        let (state, _) = self
            .console
            .changed
            .wait_timeout(state, deadline - now)
            .expect("console lock");
        Ok(state)
    }

    /// Everything the console printed so far.
    pub fn console_text(&self) -> String {
        self.console.text.lock().expect("console lock").text.clone()
    }

    /// How many times the console printed a line containing `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.console
            .text
            .lock()
            .expect("console lock")
            .text
            .matches(needle)
            .count()
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.join_reader();
                return Ok(status);
            }
            // Wait on console activity (or its close) rather than a fixed sleep.
            let state = self.console.text.lock().expect("console lock");
            let now = Instant::now();
            if now >= deadline {
                return Err(anyhow!(
                    "host {}: QEMU still running after {} s; last lines:\n{}",
                    self.config.name,
                    timeout.as_secs(),
                    tail(&state.text, 25)
                ));
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            drop(self.console.changed.wait_timeout(state, wait));
        }
    }

    /// Cuts the power: kills QEMU at once (SIGKILL). What the guest had not flushed is lost, what
    /// it had written to the disk file stays.
    pub fn power_cut(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("host {}: waiting for QEMU", self.config.name))?;
        self.join_reader();
        Ok(())
    }

    /// Stops the host (same as a power cut; the disk stays for inspection or a restart).
    pub fn stop(mut self) -> Result<()> {
        self.power_cut()
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_reader();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (for a server the guests reach at 10.0.2.2:PORT).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// What every host of a test or demo shares: the kernel, busybox and the initramfs.
#[derive(Debug, Clone)]
pub struct BootKit {
    pub kernel: Kernel,
    /// What QEMU boots: the PVH `vmlinux` of `kernel` when it could be extracted, else its bzImage.
    pub boot_image: PathBuf,
    pub busybox: PathBuf,
    /// The initramfs built with the boot selector.
    pub initrd: PathBuf,
    work: PathBuf,
}

impl BootKit {
    /// Builds the initramfs in `work` (a directory) with `selector` (the `twinroot-boot` binary),
    /// using the newest installed kernel and /bin/busybox.
    pub fn build(work: &Path, selector: &Path) -> Result<BootKit> {
        let kernel = Kernel::find_installed()?;
        let busybox = PathBuf::from("/bin/busybox");
        if !busybox.is_file() {
            bail!("/bin/busybox not found (install busybox-static)");
        }
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let initrd = work.join("initrd.cpio");
        build_initramfs(
            &InitramfsSpec {
                selector: selector.to_path_buf(),
                busybox: busybox.clone(),
                kernel: kernel.clone(),
                modules: GUEST_MODULES.iter().map(|s| s.to_string()).collect(),
            },
            &initrd,
        )?;
        let cache = std::env::temp_dir().join("twinroot-kernel-cache");
        let boot_image = pvh_kernel(&kernel, &cache)?.unwrap_or_else(|| kernel.image.clone());
        Ok(BootKit {
            boot_image,
            kernel,
            busybox,
            initrd,
            work: work.to_path_buf(),
        })
    }

    /// A normal root image spec of `version` (busybox, kernel, modules; no agent).
    pub fn rootfs(&self, version: &str) -> RootfsSpec {
        RootfsSpec::new(version, &self.busybox, &self.kernel)
    }

    /// Writes `spec`'s tree and builds its image; returns the image path (`WORK/NAME.img`).
    pub fn image(&self, name: &str, spec: &RootfsSpec) -> Result<PathBuf> {
        let dir = self.work.join(format!("rootfs-{name}"));
        write_rootfs(spec, &dir)?;
        let out = self.work.join(format!("{name}.img"));
        build_root_image(&dir, &spec.version, &out)?;
        Ok(out)
    }

    /// A host config booting `disk` with this kit, logging to `WORK/NAME.log`.
    pub fn host(&self, name: &str, disk: &HostDisk) -> HostConfig {
        HostConfig::new(
            name,
            &disk.path,
            &self.boot_image,
            &self.initrd,
            &self.work.join(format!("{name}.log")),
        )
    }

    /// A new disk `WORK/NAME.disk` with the test layout.
    pub fn disk(&self, name: &str) -> Result<HostDisk> {
        HostDisk::create(&self.work.join(format!("{name}.disk")), &TEST_LAYOUT)
    }
}

/// A binary of another workspace crate (e.g. `update-agent`), built in the same profile as the
/// running test: `TWINROOT_BIN_DIR/NAME` when that variable is set, else `NAME` in the target
/// profile directory of the current executable (`target/debug/deps/x` -> `target/debug/NAME`).
/// `scripts/test` builds every workspace binary before the tests.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("TWINROOT_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        candidates.push(dir.join(name));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "binary {name} not found next to {} (build it first: cargo build -p {name} \
             [--release], or set TWINROOT_BIN_DIR)",
            exe.display()
        )
    })
}

/// The URL under which a guest reaches a service listening on the build host's loopback `port`
/// (QEMU user-mode networking maps 10.0.2.2 to the host), e.g. `guest_url(8080, "/v1/update/")`.
pub fn guest_url(port: u16, path: &str) -> String {
    format!("http://10.0.2.2:{port}{path}")
}

/// How to run a service next to the hosts (update-server, reboot-coordinator, etcd...).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr go here.
    pub log: PathBuf,
}

/// A running service process; killed when dropped.
pub struct Service {
    pub config: ServiceConfig,
    child: Child,
}

impl Service {
    pub fn start(config: ServiceConfig) -> Result<Service> {
        let log = File::create(&config.log)
            .with_context(|| format!("creating service log {}", config.log.display()))?;
        let child = Command::new(&config.program)
            .args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "service {}: cannot start {}",
                    config.name,
                    config.program.display()
                )
            })?;
        Ok(Service { config, child })
    }

    /// Waits until something accepts TCP connections on 127.0.0.1:`port`; fails early, with the
    /// end of its log, if the service exits.
    pub fn wait_port(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "service {} exited ({status}) before listening on port {port}; log:\n{}",
                    self.config.name,
                    tail(&self.log_text(), 25)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "service {} not listening on port {port} after {} s; log:\n{}",
                    self.config.name,
                    timeout.as_secs(),
                    tail(&self.log_text(), 25)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the service logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.config.log).unwrap_or_default()
    }

    /// Stops the service (SIGKILL) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a single-member etcd on free loopback ports with its data in `dir`; returns the service
/// and its client endpoint (`http://127.0.0.1:PORT`).
pub fn start_etcd(dir: &Path) -> Result<(Service, String)> {
    let client = free_port()?;
    let peer = free_port()?;
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = dir.join("etcd-data");
    let mut service = Service::start(ServiceConfig {
        name: "etcd".into(),
        program: PathBuf::from("etcd"),
        args: vec![
            "--name".into(),
            "twinroot-e2e".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            endpoint.clone(),
            "--advertise-client-urls".into(),
            endpoint.clone(),
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("twinroot-e2e={peer_url}"),
        ],
        env: Vec::new(),
        log: dir.join("etcd.log"),
    })?;
    service.wait_port(client, Duration::from_secs(30))?;
    Ok((service, endpoint))
}

/// A release signing key and the keyring that trusts it (made with image-tools).
#[derive(Debug, Clone)]
pub struct SigningSetup {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub keyring: PathBuf,
}

impl SigningSetup {
    /// Generates a key pair and a keyring (threshold 1) in `dir`.
    pub fn generate(dir: &Path) -> Result<SigningSetup> {
        let private_key = dir.join("release-key.pem");
        let public_key = dir.join("release-key.pub.pem");
        let keyring = dir.join("keyring.json");
        image_tools::keys::keygen(&private_key, &public_key)?;
        image_tools::keys::make_keyring(&image_tools::keys::KeyringOptions {
            public: vec![public_key.clone()],
            threshold: 1,
            serial: 1,
            out: keyring.clone(),
        })?;
        Ok(SigningSetup {
            private_key,
            public_key,
            keyring,
        })
    }

    /// Signs `image` of `version` into a bundle at `out` (as `image-tool bundle` does).
    pub fn bundle(&self, image: &Path, version: &str, out: &Path) -> Result<()> {
        let version = semver::Version::parse(version)
            .with_context(|| format!("bundle version {version:?}"))?;
        image_tools::release::bundle(&image_tools::release::BundleOptions {
            image: image.to_path_buf(),
            version,
            keys: vec![self.private_key.clone()],
            out: out.to_path_buf(),
            created_unix: 0,
            level: 3,
            board: None,
            min_source_version: None,
        })?;
        Ok(())
    }
}

impl HostDisk {
    /// Writes the image inside a signed bundle into `slot`, after verifying the bundle header
    /// against `keyring`; the image is verified (sizes, digests) while it streams, and the call
    /// fails if any check fails. Returns the bundle's version.
    pub fn write_slot_from_bundle(
        &self,
        slot: SlotName,
        bundle: &Path,
        keyring: &Path,
    ) -> Result<semver::Version> {
        let keyring = twinroot_format::keyring::Keyring::load(keyring)?;
        let mut file = std::io::BufReader::new(
            File::open(bundle).with_context(|| format!("opening bundle {}", bundle.display()))?,
        );
        let header = twinroot_format::bundle::read_header(&mut file, &keyring)
            .with_context(|| format!("verifying bundle {}", bundle.display()))?;
        let disk = self.open()?;
        let mut writer = disk.slot_writer(slot, None)?;
        let mut image = header.image_reader(file);
        std::io::copy(&mut image, &mut writer).with_context(|| {
            format!(
                "writing bundle {} into slot {slot} of {}",
                bundle.display(),
                self.path.display()
            )
        })?;
        writer.finish()?;
        Ok(header.manifest().os_version.clone())
    }
}

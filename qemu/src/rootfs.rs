//! Contents of a twinroot root image (one A/B slot), written to a directory that `image-tool build`
//! (or [`crate::harness::build_root_image`]) turns into a read-only image.
//!
//! Layout of an image:
//! - `/bin/busybox` (static) and its applet links in /bin; `/sbin/init` is busybox init with
//!   `/etc/inittab` running `/etc/twinroot/rc.boot`, then the agent (respawned) if present;
//! - `/etc/os-release` with `VERSION` and `VERSION_ID`;
//! - `/boot/vmlinuz` and `/lib/modules/KVER/` (the guest modules, `modules.dep` subset and
//!   `twinroot-modules`, the load order): each image carries its own kernel;
//! - `/usr/bin/update-agent` with its shared libraries, its config in
//!   `/usr/lib/twinroot/agent.d/`, the keyring at [`KEYRING_PATH`], health-check hooks in
//!   [`CHECKS_DIR`]`/required.d` and `/wanted.d`;
//! - `/usr/lib/twinroot/boot.d/*`: executables run by rc.boot before the version line (the hook
//!   through which versions differ in behaviour);
//! - mount points /proc /sys /dev /run /tmp /var and /state (the STATE partition).
//!
//! rc.boot prints [`VERSION_LINE_PREFIX`]` VERSION slot SLOT` once the network is up.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::initramfs::{Kernel, busybox_applets};
use crate::libs::{copy_stripped, shared_libraries};
use crate::modules::ModuleIndex;

/// Start of the line rc.boot prints when the host is up: `twinroot: booted version 1.0.0 slot a`.
pub const VERSION_LINE_PREFIX: &str = "twinroot: booted version";
/// Printed by an image built with [`InitBehaviour::Panic`] right before its init exits.
pub const PANIC_LINE: &str = "twinroot: init crashing on purpose";
/// Where the agent binary goes.
pub const AGENT_PATH: &str = "usr/bin/update-agent";
/// The agent configuration fragment of the image.
pub const AGENT_CONFIG_PATH: &str = "usr/lib/twinroot/agent.d/00-image.toml";
/// The trusted keyring of the image.
pub const KEYRING_PATH: &str = "usr/lib/twinroot/keyring.json";
/// Holds `required.d/` and `wanted.d/` health-check hooks.
pub const CHECKS_DIR: &str = "etc/twinroot/check";
/// Executables run at boot, before the version line.
pub const BOOT_HOOKS_DIR: &str = "usr/lib/twinroot/boot.d";

/// How the image's init behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitBehaviour {
    /// Boots normally: network, version line, agent.
    #[default]
    Normal,
    /// `/sbin/init` prints [`PANIC_LINE`] and exits: the kernel panics ("Attempted to kill init")
    /// and, with `panic=N` on its command line, reboots. A broken release.
    Panic,
}

/// The update agent shipped in an image.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub binary: PathBuf,
    /// Arguments the init passes it (e.g. `["daemon"]`).
    pub args: Vec<String>,
    /// TOML written to [`AGENT_CONFIG_PATH`].
    pub config: String,
}

/// Where the agent keeps its state in an image: on the STATE partition, which survives updates.
pub const AGENT_STATE_DIR: &str = "/state/twinroot-agent";

/// The agent configuration baked into test and demo images (TOML for [`AGENT_CONFIG_PATH`]).
/// Guests reach services on the build host at `10.0.2.2` (see `harness::guest_url`).
#[derive(Debug, Clone)]
pub struct AgentImageConfig {
    /// Omaha endpoint, e.g. `http://10.0.2.2:8080/v1/update/`.
    pub server_url: Option<String>,
    /// Channel (Omaha track).
    pub track: String,
    /// `immediate`, `coordinated` or `off`.
    pub reboot_strategy: String,
    /// FleetLock server, e.g. `http://10.0.2.2:8081` (needed for `coordinated`).
    pub fleetlock_url: Option<String>,
    /// Seconds before the first update check and between checks (short for tests).
    pub poll_secs: u64,
    /// Whether reaching the update server is one of the post-boot checks (on by default when a
    /// server is configured).
    pub check_server: bool,
}

impl AgentImageConfig {
    pub fn new(server_url: &str, track: &str) -> Self {
        AgentImageConfig {
            server_url: Some(server_url.to_string()),
            track: track.to_string(),
            reboot_strategy: "immediate".to_string(),
            fleetlock_url: None,
            poll_secs: 2,
            check_server: true,
        }
    }

    /// An agent with no update server: it only runs the post-boot checks and marks slots.
    pub fn offline() -> Self {
        AgentImageConfig {
            server_url: None,
            track: "stable".to_string(),
            reboot_strategy: "immediate".to_string(),
            fleetlock_url: None,
            poll_secs: 2,
            check_server: false,
        }
    }

    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "# twinroot image agent configuration\n[agent]\ndisk = \"/dev/vda\"\nstate_dir = {:?}\n\
             keyring = \"/{KEYRING_PATH}\"\nmachine_id_path = \"/state/machine-id\"\n\n[server]\n",
            AGENT_STATE_DIR
        );
        if let Some(url) = &self.server_url {
            t.push_str(&format!("url = {url:?}\n"));
        }
        let p = self.poll_secs;
        t.push_str(&format!(
            "track = {:?}\nfirst_check_min_secs = {p}\nfirst_check_max_secs = {p}\n\
             interval_secs = {p}\njitter_secs = 0\nmax_backoff_secs = {}\n\n",
            self.track,
            (p * 4).max(1)
        ));
        t.push_str(&format!(
            "[checks]\ndir = \"/{CHECKS_DIR}\"\nserver_reachable = {}\nsystem_not_degraded = false\n\n\
             [reboot]\nstrategy = {:?}\nmethod = \"syscall\"\n",
            self.check_server && self.server_url.is_some(),
            self.reboot_strategy
        ));
        if let Some(url) = &self.fleetlock_url {
            t.push_str(&format!("fleetlock_url = {url:?}\n"));
        }
        t.push_str("\n[dbus]\nbus = \"none\"\n");
        t
    }
}

/// A file added to an image (path relative to the image root).
#[derive(Debug, Clone)]
pub struct ExtraFile {
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

impl ExtraFile {
    pub fn new(path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        ExtraFile {
            path: path.trim_start_matches('/').to_string(),
            contents: contents.into(),
            mode,
        }
    }

    /// A shell script in `required.d` (a failing one makes every boot of the image bad).
    pub fn required_check(name: &str, script: &str) -> Self {
        Self::new(
            &format!("{CHECKS_DIR}/required.d/{name}"),
            format!("#!/bin/sh\n{script}\n"),
            0o755,
        )
    }

    /// A shell script in `wanted.d` (a failure is only a warning).
    pub fn wanted_check(name: &str, script: &str) -> Self {
        Self::new(
            &format!("{CHECKS_DIR}/wanted.d/{name}"),
            format!("#!/bin/sh\n{script}\n"),
            0o755,
        )
    }

    /// A shell script run at boot before the version line.
    pub fn boot_hook(name: &str, script: &str) -> Self {
        Self::new(
            &format!("{BOOT_HOOKS_DIR}/{name}"),
            format!("#!/bin/sh\n{script}\n"),
            0o755,
        )
    }
}

/// Everything that makes one version's root image.
#[derive(Debug, Clone)]
pub struct RootfsSpec {
    /// The OS version (`/etc/os-release` VERSION and VERSION_ID), e.g. `1.0.0`.
    pub version: String,
    pub busybox: PathBuf,
    pub kernel: Kernel,
    /// Kernel modules shipped under /lib/modules (with their dependencies).
    pub modules: Vec<String>,
    /// Copy the kernel image to /boot/vmlinuz (off only makes smaller test images).
    pub include_kernel: bool,
    pub init: InitBehaviour,
    pub agent: Option<AgentSpec>,
    /// The keyring file copied to [`KEYRING_PATH`].
    pub keyring: Option<Vec<u8>>,
    pub files: Vec<ExtraFile>,
}

impl RootfsSpec {
    /// A normal image of `version` with busybox, the kernel and the guest modules, no agent.
    pub fn new(version: &str, busybox: &Path, kernel: &Kernel) -> Self {
        RootfsSpec {
            version: version.to_string(),
            busybox: busybox.to_path_buf(),
            kernel: kernel.clone(),
            modules: crate::modules::GUEST_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            include_kernel: true,
            init: InitBehaviour::Normal,
            agent: None,
            keyring: None,
            files: Vec::new(),
        }
    }
}

/// The CA bundle copied into images that ship the agent.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The modules the root init loads itself when the initramfs did not (network).
const NET_MODULES: &[&str] = &["virtio_net"];

/// Writes the image tree of `spec` into `dir` (created; must not exist or be empty).
pub fn write_rootfs(spec: &RootfsSpec, dir: &Path) -> Result<()> {
    if dir.exists()
        && fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("root image directory {} is not empty", dir.display());
    }
    if semver_like(&spec.version).is_none() {
        bail!(
            "version {:?} is not a semantic version (like 1.2.3)",
            spec.version
        );
    }
    for d in [
        "bin",
        "sbin",
        "etc/twinroot",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var",
        "state",
        "root",
        "boot",
        "usr/bin",
        "usr/sbin",
        BOOT_HOOKS_DIR,
    ] {
        mkdir(&dir.join(d))?;
    }
    mkdir(&dir.join(CHECKS_DIR).join("required.d"))?;
    mkdir(&dir.join(CHECKS_DIR).join("wanted.d"))?;

    copy(&spec.busybox, &dir.join("bin/busybox"), 0o755)?;
    for applet in busybox_applets(&spec.busybox)? {
        if applet == "busybox" {
            continue;
        }
        let link = dir.join("bin").join(&applet);
        if !link.exists() {
            symlink("busybox", &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }

    let v = &spec.version;
    write(
        &dir.join("etc/os-release"),
        format!(
            "NAME=twinroot\nID=twinroot\nPRETTY_NAME=\"twinroot {v}\"\nVERSION={v}\nVERSION_ID={v}\n"
        ),
        0o644,
    )?;
    write(&dir.join("etc/hostname"), "twinroot\n", 0o644)?;
    symlink("/state/machine-id", dir.join("etc/machine-id")).context("linking etc/machine-id")?;
    write(
        &dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write(&dir.join("etc/group"), "root:x:0:\n", 0o644)?;

    write_kernel(spec, dir)?;

    match spec.init {
        InitBehaviour::Normal => {
            symlink("/bin/busybox", dir.join("sbin/init")).context("linking sbin/init")?;
            write(
                &dir.join("etc/inittab"),
                inittab(spec.agent.is_some()),
                0o644,
            )?;
            write(&dir.join("etc/twinroot/rc.boot"), RC_BOOT, 0o755)?;
        }
        InitBehaviour::Panic => {
            write(
                &dir.join("sbin/init"),
                format!("#!/bin/sh\necho \"{PANIC_LINE} (version {v})\"\nexit 1\n"),
                0o755,
            )?;
        }
    }

    if let Some(agent) = &spec.agent {
        let dest = dir.join(AGENT_PATH);
        copy_stripped(&agent.binary, &dest)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", dest.display()))?;
        copy_libraries(&agent.binary, dir)?;
        // The agent's HTTP client (rustls with the platform verifier) refuses to start without
        // trusted roots: ship the build host's CA bundle.
        let ca = Path::new(CA_BUNDLE);
        if ca.is_file() {
            copy(ca, &dir.join(CA_BUNDLE.trim_start_matches('/')), 0o644)?;
        }
        write(&dir.join(AGENT_CONFIG_PATH), &agent.config, 0o644)?;
        let args = agent
            .args
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        write(
            &dir.join("etc/twinroot/run-agent"),
            format!("#!/bin/sh\nexec /{AGENT_PATH} {args}\n"),
            0o755,
        )?;
    }
    if let Some(keyring) = &spec.keyring {
        write(&dir.join(KEYRING_PATH), keyring, 0o644)?;
    }
    for f in &spec.files {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            mkdir(parent)?;
        }
        write(&path, &f.contents, f.mode)?;
    }
    Ok(())
}

fn write_kernel(spec: &RootfsSpec, dir: &Path) -> Result<()> {
    let kver = &spec.kernel.version;
    if spec.include_kernel {
        copy(&spec.kernel.image, &dir.join("boot/vmlinuz"), 0o644)?;
        write(&dir.join("boot/kernel-version"), format!("{kver}\n"), 0o644)?;
    }
    let index = ModuleIndex::load(&spec.kernel.modules_dir)?;
    let names: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let order = index.load_order(&names)?;
    let mod_dir = dir.join("lib/modules").join(kver);
    let mut dep = String::new();
    for rel in &order {
        copy(
            &spec.kernel.modules_dir.join(rel),
            &mod_dir.join(rel),
            0o644,
        )?;
        dep.push_str(rel);
        dep.push_str(":\n");
    }
    write(&mod_dir.join("modules.dep"), &dep, 0o644)?;
    write(
        &mod_dir.join("twinroot-modules"),
        order.join("\n") + "\n",
        0o644,
    )?;
    let net = index.load_order(NET_MODULES)?;
    write(
        &mod_dir.join("twinroot-net-modules"),
        net.join("\n") + "\n",
        0o644,
    )
}

fn inittab(agent: bool) -> String {
    let mut t = String::from("::sysinit:/etc/twinroot/rc.boot\n");
    if agent {
        t.push_str("::respawn:/etc/twinroot/run-agent\n");
    }
    t.push_str("::ctrlaltdel:/bin/reboot\n::shutdown:/bin/sync\n");
    t
}

/// The boot script of a normal image (run by busybox init as `sysinit`).
const RC_BOOT: &str = r#"#!/bin/sh
# twinroot root image boot script: API filesystems, network, machine id, boot hooks.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
[ -e /proc/mounts ] || mount -t proc proc /proc
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mounted /run || mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /var
. /etc/os-release
slot=$(cat /run/twinroot/booted-slot 2>/dev/null || echo unknown)
kver=$(uname -r)
if [ ! -e /sys/class/net/eth0 ]; then
    for m in $(cat /lib/modules/$kver/twinroot-net-modules); do
        insmod /lib/modules/$kver/$m 2>/dev/null
    done
fi
hostname -F /etc/hostname
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
if mounted /state; then
    if [ ! -s /state/machine-id ]; then
        # Written once per host: make it durable before anything reports it to a server.
        tr -d '-' < /proc/sys/kernel/random/uuid > /state/machine-id.new
        sync /state/machine-id.new
        mv /state/machine-id.new /state/machine-id
        sync /state
    fi
    mkdir -p /state/twinroot
else
    echo "twinroot: warning: /state is not mounted"
fi
for hook in /usr/lib/twinroot/boot.d/*; do
    [ -x "$hook" ] && "$hook"
done
echo "twinroot: booted version $VERSION slot $slot"
"#;

fn semver_like(v: &str) -> Option<()> {
    let core = v.split(['-', '+']).next()?;
    let parts: Vec<&str> = core.split('.').collect();
    (parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.parse::<u64>().is_ok()))
    .then_some(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn write(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        mkdir(parent)?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        mkdir(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

/// Copies the shared libraries `binary` needs to the same paths under `root`.
fn copy_libraries(binary: &Path, root: &Path) -> Result<()> {
    for lib in shared_libraries(binary)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib);
        let to = root.join(rel);
        if !to.exists() {
            copy(&lib, &to, 0o755)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_be_semantic() {
        assert!(semver_like("1.2.3").is_some());
        assert!(semver_like("1.2.3-rc.1").is_some());
        assert!(semver_like("1.2").is_none());
        assert!(semver_like("v1.2.3").is_none());
    }

    #[test]
    fn inittab_runs_the_agent_only_when_present() {
        assert!(!inittab(false).contains("run-agent"));
        assert!(inittab(true).contains("::respawn:/etc/twinroot/run-agent"));
    }

    #[test]
    fn agent_config_points_at_the_host() {
        let mut c = AgentImageConfig::new("http://10.0.2.2:8080/v1/update/", "beta");
        c.reboot_strategy = "coordinated".into();
        c.fleetlock_url = Some("http://10.0.2.2:8081".into());
        let t = c.to_toml();
        assert!(
            t.contains("url = \"http://10.0.2.2:8080/v1/update/\""),
            "{t}"
        );
        assert!(t.contains("track = \"beta\""), "{t}");
        assert!(t.contains("strategy = \"coordinated\""), "{t}");
        assert!(
            t.contains("fleetlock_url = \"http://10.0.2.2:8081\""),
            "{t}"
        );
        assert!(t.contains("state_dir = \"/state/twinroot-agent\""), "{t}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}

//! End-to-end tests (see tests/tests/): shared fixtures on top of the `twinroot-qemu` harness.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use twinroot_qemu::harness::BootKit;

/// Deadline for one boot to reach a console line (TCG on 2 shared cores is slow; a boot
/// normally takes 7-15 s).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A test's work directory with a [`BootKit`] (initramfs, kernel, busybox) built in it.
/// The directory (images, disks, console logs) is removed at the end unless
/// `TWINROOT_E2E_KEEP=1` is set, in which case its path is printed.
pub struct Lab {
    pub kit: BootKit,
    dir: Option<tempfile::TempDir>,
}

impl Lab {
    /// `selector` is the boot selector binary: pass `env!("CARGO_BIN_EXE_twinroot-e2e-boot")`.
    pub fn new(selector: &str) -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix("twinroot-e2e-")
            .tempdir()
            .context("creating the test work directory")?;
        let kit = BootKit::build(dir.path(), Path::new(selector))?;
        Ok(Lab {
            kit,
            dir: Some(dir),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("work dir").path()
    }

    /// A host disk `name` with `image` in slot A, marked good (slot B empty).
    pub fn disk_on(&self, name: &str, image: &Path) -> Result<twinroot_qemu::harness::HostDisk> {
        let disk = self.kit.disk(name)?;
        disk.write_slot(twinroot_format::slot::SlotName::A, image)?;
        disk.set_attrs(
            twinroot_format::slot::SlotName::A,
            twinroot_qemu::harness::GOOD,
        )?;
        Ok(disk)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("TWINROOT_E2E_KEEP").is_some_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("twinroot-e2e: keeping {}", dir.keep().display());
        }
    }
}

/// Runs a workspace binary (`update-server`, `reboot-coordinator`, ...) with `args`; returns its
/// stdout, or an error with its stderr.
pub fn run_cli(binary: &str, args: &[&str]) -> Result<String> {
    let program = twinroot_qemu::harness::workspace_binary(binary)?;
    let out = std::process::Command::new(&program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{binary} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A real update-server on a free loopback port (SQLite in the lab), with an admin token.
pub struct UpdateServer {
    pub service: twinroot_qemu::harness::Service,
    pub port: u16,
    /// `http://127.0.0.1:PORT` (the guests use `guest_url(port, "/v1/update/")`).
    pub base: String,
    pub token: String,
}

impl UpdateServer {
    /// Starts the server trusting `keyring` for uploads, with its data and log in the lab.
    pub fn start(lab: &Lab, keyring: &Path) -> Result<UpdateServer> {
        Self::start_in(lab.path(), keyring)
    }

    /// Starts the server with its data in `dir/server` and its log in `dir/update-server.log`.
    pub fn start_in(dir: &Path, keyring: &Path) -> Result<UpdateServer> {
        use twinroot_qemu::harness::{Service, ServiceConfig, free_port, workspace_binary};
        let port = free_port()?;
        let data = dir.join("server");
        std::fs::create_dir_all(&data)?;
        let data_arg = data.display().to_string();
        let mut service = Service::start(ServiceConfig {
            name: "update-server".into(),
            program: workspace_binary("update-server")?,
            args: vec![
                "serve".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--data-dir".into(),
                data_arg.clone(),
                "--keyring".into(),
                keyring.display().to_string(),
            ],
            env: Vec::new(),
            log: dir.join("update-server.log"),
        })?;
        service.wait_port(port, Duration::from_secs(60))?;
        let token = run_cli(
            "update-server",
            &[
                "token",
                "create",
                "--data-dir",
                &data_arg,
                "--role",
                "admin",
            ],
        )?
        .trim()
        .to_string();
        Ok(UpdateServer {
            service,
            port,
            base: format!("http://127.0.0.1:{port}"),
            token,
        })
    }

    /// `update-server SUBCOMMAND... --server URL --token T REST...`.
    pub fn cli(&self, subcommand: &[&str], rest: &[&str]) -> Result<String> {
        let conn = [
            "--server",
            self.base.as_str(),
            "--token",
            self.token.as_str(),
        ];
        run_cli("update-server", &[subcommand, &conn[..], rest].concat())
    }

    pub fn upload(&self, bundle: &Path) -> Result<()> {
        self.cli(&["release", "upload"], &[&bundle.display().to_string()])
            .map(drop)
    }

    /// Bundles `image` as `version` (next to the image), uploads it and promotes it to `channel`
    /// (skipping the channel order).
    pub fn publish(
        &self,
        keys: &twinroot_qemu::harness::SigningSetup,
        image: &Path,
        version: &str,
        channel: &str,
    ) -> Result<()> {
        let bundle = image.with_extension("bundle");
        keys.bundle(image, version, &bundle)?;
        self.upload(&bundle)?;
        self.promote(version, channel)
    }

    /// Promotes `version` to `channel`, skipping the channel order.
    pub fn promote(&self, version: &str, channel: &str) -> Result<()> {
        self.cli(
            &["release", "promote"],
            &[version, "--channel", channel, "--force"],
        )
        .map(drop)
    }

    /// Promotes `version` to `channel` the way an operator does: the server enforces the
    /// alpha -> beta -> stable order.
    pub fn promote_in_order(&self, version: &str, channel: &str) -> Result<()> {
        self.cli(&["release", "promote"], &[version, "--channel", channel])
            .map(drop)
    }

    /// Polls the instance list (up to [`BOOT_TIMEOUT`]) until an instance satisfies `want` and
    /// returns it; fails with `what`, the last list and the server log.
    pub fn wait_for_instance(
        &self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        poll_until(
            BOOT_TIMEOUT,
            what,
            || {
                let list = self.instances()?;
                Ok(list
                    .as_array()
                    .and_then(|a| a.iter().find(|i| want(i)))
                    .cloned())
            },
            || {
                format!(
                    "{:?}\nserver log:\n{}",
                    self.instances().ok(),
                    self.service.log_text()
                )
            },
        )
    }

    /// The server's instance list (JSON array).
    pub fn instances(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.cli(&["instances"], &["--json"])?,
        )?)
    }
}

/// etcd plus a real reboot-coordinator (FleetLock) on free loopback ports.
pub struct Coordinator {
    pub service: twinroot_qemu::harness::Service,
    pub etcd: twinroot_qemu::harness::Service,
    pub etcd_endpoint: String,
    pub port: u16,
}

impl Coordinator {
    /// Starts etcd and the coordinator with `slots` reboot slots per group, logs in the lab.
    pub fn start(lab: &Lab, slots: u32) -> Result<Coordinator> {
        Self::start_in(lab.path(), slots)
    }

    /// Starts etcd (data and log under `dir/etcd`) and the coordinator (log in
    /// `dir/reboot-coordinator.log`).
    pub fn start_in(dir: &Path, slots: u32) -> Result<Coordinator> {
        use twinroot_qemu::harness::{
            Service, ServiceConfig, free_port, start_etcd, workspace_binary,
        };
        let etcd_dir = dir.join("etcd");
        std::fs::create_dir_all(&etcd_dir)?;
        let (etcd, etcd_endpoint) = start_etcd(&etcd_dir)?;
        let port = free_port()?;
        let mut service = Service::start(ServiceConfig {
            name: "reboot-coordinator".into(),
            program: workspace_binary("reboot-coordinator")?,
            args: vec![
                "serve".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--etcd".into(),
                etcd_endpoint.clone(),
                "--default-slots".into(),
                slots.to_string(),
            ],
            env: Vec::new(),
            log: dir.join("reboot-coordinator.log"),
        })?;
        service.wait_port(port, Duration::from_secs(60))?;
        Ok(Coordinator {
            service,
            etcd,
            etcd_endpoint,
            port,
        })
    }

    /// `reboot-coordinator status` (groups, holders, recent activity).
    pub fn status(&self) -> Result<String> {
        run_cli(
            "reboot-coordinator",
            &["status", "--etcd", &self.etcd_endpoint, "--activity", "50"],
        )
    }
}

/// A root image `vVERSION` with the update-agent (`daemon`), `agent`'s configuration, the
/// trusted keyring of `keys` and the `files` of this version (no kernel inside: the tests boot
/// the shared one).
pub fn agent_image(
    lab: &Lab,
    keys: &twinroot_qemu::harness::SigningSetup,
    agent: &twinroot_qemu::rootfs::AgentImageConfig,
    version: &str,
    files: Vec<twinroot_qemu::rootfs::ExtraFile>,
) -> Result<std::path::PathBuf> {
    let mut spec = lab.kit.rootfs(version);
    spec.include_kernel = false;
    spec.keyring = Some(std::fs::read(&keys.keyring)?);
    spec.agent = Some(twinroot_qemu::rootfs::AgentSpec {
        binary: twinroot_qemu::harness::workspace_binary("update-agent")?,
        args: vec!["daemon".into()],
        config: agent.to_toml(),
    });
    spec.files = files;
    lab.kit.image(&format!("v{version}"), &spec)
}

/// Whether a server instance (JSON) is Complete.
pub fn is_complete(instance: &serde_json::Value) -> bool {
    instance["status"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("complete"))
}

/// `len` bytes that no compressor can shrink (xorshift64*, fixed seed: reproducible images).
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `probe` every 500 ms until it returns `Some`, or fails after `timeout` with `what` and
/// the last value `describe` gives.
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<Option<T>>,
    describe: impl Fn() -> String,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("{what} (after {} s): {}", timeout.as_secs(), describe());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

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
    /// Starts the server trusting `keyring` for uploads.
    pub fn start(lab: &Lab, keyring: &Path) -> Result<UpdateServer> {
        use twinroot_qemu::harness::{Service, ServiceConfig, free_port, workspace_binary};
        let port = free_port()?;
        let data = lab.path().join("server");
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
            log: lab.path().join("server.log"),
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

    /// Promotes `version` to `channel`, skipping the channel order.
    pub fn promote(&self, version: &str, channel: &str) -> Result<()> {
        self.cli(
            &["release", "promote"],
            &[version, "--channel", channel, "--force"],
        )
        .map(drop)
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
    /// Starts etcd and the coordinator with `slots` reboot slots per group.
    pub fn start(lab: &Lab, slots: u32) -> Result<Coordinator> {
        use twinroot_qemu::harness::{
            Service, ServiceConfig, free_port, start_etcd, workspace_binary,
        };
        let (etcd, etcd_endpoint) = start_etcd(lab.path())?;
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
            log: lab.path().join("coordinator.log"),
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

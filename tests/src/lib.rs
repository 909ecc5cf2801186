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

//! One function per subcommand of the `update-agent` binary.

use std::path::PathBuf;

use anyhow::{Context, anyhow};

use crate::config::{self, ConfigRoots, Settings};
use crate::host::{self, Overrides};

/// Where the configuration comes from, plus flag overrides.
#[derive(Debug, Clone, Default)]
pub struct Common {
    /// Replaces the default configuration roots when not empty.
    pub config_dirs: Vec<PathBuf>,
    /// Extra fragments applied last.
    pub config_files: Vec<PathBuf>,
    pub overrides: Overrides,
}

impl Common {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut roots = if self.config_dirs.is_empty() {
            ConfigRoots::from_env()
        } else {
            ConfigRoots {
                dirs: self.config_dirs.clone(),
                extra_files: Vec::new(),
            }
        };
        roots.extra_files.extend(self.config_files.iter().cloned());
        let mut s = config::load(&roots)?;
        self.overrides.apply(&mut s);
        Ok(s)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `update-agent install BUNDLE`: applies a local bundle (or a URL) to the inactive slot.
pub fn install(common: &Common, bundle: &str) -> anyhow::Result<()> {
    let settings = common.settings()?;
    let rt = runtime()?;
    let mut agent = host::build_agent(&settings, rt.handle())?;
    let mut source = {
        let client =
            crate::net::http_client(settings.server.timeout).map_err(|e| anyhow!(e.message))?;
        host::source_for(bundle, &client, rt.handle())
    };
    let installed = agent
        .install_from(&mut *source, false)
        .map_err(|e| anyhow!("{e} [{}]", e.kind))?;
    println!(
        "installed {} into slot {} ({}){}",
        installed.version,
        installed.slot,
        installed.attrs,
        if installed.resumed_from > 0 {
            format!(", resumed at image byte {}", installed.resumed_from)
        } else {
            String::new()
        }
    );
    Ok(())
}

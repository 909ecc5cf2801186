use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use twinroot_format::slot::SlotName;
use update_agent::commands::{self, Common};
use update_agent::host::Overrides;

/// twinroot update agent: verified A/B updates with post-boot checks and automatic revert.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct CommonArgs {
    /// Configuration directory (repeatable; replaces the default drop-in roots).
    #[arg(long = "config-dir", global = true)]
    config_dirs: Vec<PathBuf>,
    /// Extra configuration fragment applied last (repeatable).
    #[arg(long = "config", global = true)]
    config_files: Vec<PathBuf>,
    /// Disk holding the A/B slots (block device or image file).
    #[arg(long, global = true)]
    disk: Option<PathBuf>,
    /// Slot the running system booted from (default: twinroot.slot= on the kernel command line).
    #[arg(long, global = true)]
    booted_slot: Option<SlotName>,
    /// Keyring file that bundles must be signed by.
    #[arg(long, global = true)]
    keyring: Option<PathBuf>,
    /// State directory.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Running OS version (default: VERSION_ID from os-release).
    #[arg(long, global = true)]
    current_version: Option<semver::Version>,
    /// Allow installing a version that is not newer than the running one.
    #[arg(long, global = true)]
    allow_downgrade: bool,
    /// This host's board name.
    #[arg(long, global = true)]
    board: Option<String>,
    /// D-Bus bus: system, session, none or an address (unix:path=...).
    #[arg(long, global = true)]
    bus: Option<update_agent::config::BusChoice>,
}

impl CommonArgs {
    fn common(&self) -> Common {
        Common {
            config_dirs: self.config_dirs.clone(),
            config_files: self.config_files.clone(),
            overrides: Overrides {
                disk: self.disk.clone(),
                booted_slot: self.booted_slot,
                keyring: self.keyring.clone(),
                state_dir: self.state_dir.clone(),
                current_version: self.current_version.clone(),
                allow_downgrade: self.allow_downgrade,
                board: self.board.clone(),
                bus: self.bus.clone(),
            },
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Install a bundle (local file or http(s) URL) into the inactive slot.
    Install {
        /// Bundle file or URL.
        bundle: String,
    },
    /// Run the agent (post-boot checks, update polling, reboots, D-Bus API).
    Daemon,
    /// Show what the running agent is doing (over D-Bus).
    Status,
    /// Ask the running agent to check for an update now and install it.
    Check,
    /// Ask the running agent to check, install and reboot now.
    ApplyNow,
    /// Cancel a staged update, or make the previous slot the next boot.
    Rollback,
    /// Allow a version this host rolled back from to be installed again.
    Unquarantine { version: String },
    /// Run N simulated hosts (the real agent core, in-memory disks) against a real server.
    Simulate(Box<update_agent::simulate::SimulateArgs>),
}

fn main() -> ExitCode {
    let level = std::env::var("UPDATE_AGENT_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if journald {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let cli = Cli::parse();
    let common = cli.common.common();
    let result = match &cli.command {
        Command::Install { bundle } => commands::install(&common, bundle),
        Command::Daemon => commands::daemon(&common),
        Command::Status => commands::status(&common),
        Command::Check => commands::check(&common),
        Command::ApplyNow => commands::apply_now(&common),
        Command::Rollback => commands::rollback(&common),
        Command::Unquarantine { version } => commands::unquarantine(&common, version),
        Command::Simulate(args) => update_agent::simulate::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("update-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

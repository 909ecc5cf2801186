use clap::{Parser, Subcommand};
use reboot_coordinator::cli;

/// Reboot coordinator: an etcd-backed reboot semaphore behind a FleetLock HTTP server.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve FleetLock (POST /v1/pre-reboot, POST /v1/steady-state, GET /metrics, GET /v1/status).
    Serve(cli::ServeArgs),
    /// Show groups, slot counts, holders (age, time to expiry) and recent activity.
    Status(cli::StatusArgs),
    /// Free the slot of a holder by hand.
    Release(cli::ReleaseArgs),
    /// Change the slot count of a group.
    SetSlots(cli::SetSlotsArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Serve(a) => cli::serve(a).await,
        Command::Status(a) => cli::status(a).await,
        Command::Release(a) => cli::release(a).await,
        Command::SetSlots(a) => cli::set_slots(a).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reboot-coordinator: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

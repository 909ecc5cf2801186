//! Seeds a data directory with a fleet and its history for the dashboard benchmark
//! (bench/dashboard.sh), then prints an admin token.
//!
//! Usage: dashboard_seed DATA_DIR HOSTS DAYS

#[path = "../tests/dashboard_fleet/mod.rs"]
mod dashboard_fleet;

use std::time::Instant;

use dashboard_fleet::{FleetSpec, seed};
use update_server::policy::{HaltRule, Ramp, RolloutPolicy};
use update_server::server::{ServerConfig, open_state};
use update_server::store::{ReleaseRow, Role, Store};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: dashboard_seed DATA_DIR HOSTS DAYS");
    let hosts: usize = args[2].parse()?;
    let days: i64 = args[3].parse()?;
    let state = open_state(ServerConfig::new(args[1].clone().into())).await?;
    let store = &state.store;
    let now = chrono::Utc::now().timestamp();
    let start = now - days * 86_400;
    store
        .insert_release(&ReleaseRow {
            version: "2.0.0".into(),
            sha256: "00".repeat(32),
            sha1_base64: String::new(),
            size: 300 << 20,
            salt: "bench".into(),
            board: Some("amd64-usr".into()),
            min_source_version: None,
            created_unix: start,
            uploaded_at: start,
            channels: Vec::new(),
        })
        .await?;
    let mut tx = store.begin().await?;
    sqlx::query(
        "UPDATE channels SET release_version = '2.0.0', promoted_at = $1 WHERE name = 'beta'",
    )
    .bind(start)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO promotions (version, channel, forced, at) VALUES ('2.0.0', 'beta', 1, $1)",
    )
    .bind(start)
    .execute(&mut *tx)
    .await?;
    Store::activity_in(
        &mut tx,
        start,
        "release_promoted",
        Some("beta"),
        Some(""),
        Some("2.0.0"),
        "release 2.0.0 promoted to beta",
    )
    .await?;
    let policy = RolloutPolicy {
        start_percent: 1.0,
        ramp: Ramp::Linear {
            duration_secs: days * 86_400,
        },
        halt: Some(HaltRule {
            max_failure_percent: 5.0,
            min_reports: 100,
        }),
        ..RolloutPolicy::default()
    };
    Store::upsert_rollout_policy(&mut tx, "beta", "", &policy, start).await?;
    tx.commit().await?;
    let t = Instant::now();
    let grant_every = ((days * 86_400 - 7200) / hosts as i64).max(1);
    let fig = seed(
        store,
        &FleetSpec {
            channel: "beta".into(),
            old: "1.0.0".into(),
            release: "2.0.0".into(),
            hosts,
            start,
            now,
            grant_after: 3600,
            grant_every,
            granted: hosts,
            fail_every: 50,
        },
    )
    .await;
    eprintln!(
        "seeded {hosts} hosts, {} history rows over {days} days in {:.1} s ({} updated, {} failed)",
        fig.history_rows,
        t.elapsed().as_secs_f64(),
        fig.updated,
        fig.failed
    );
    let token = update_server::api::create_token(store, Role::Admin, "bench").await?;
    println!("{token}");
    Ok(())
}

//! A seeded fleet with a known history, written straight into the store (as the check-in path
//! would have written it), for the browser test and the dashboard benchmark.

#![allow(dead_code)]

use update_server::store::{HistoryRow, InstanceRow, Store};

/// What to seed: `hosts` hosts on `channel`, first seen from `start`; host `i` is granted
/// `release` at `start + grant_after + i * grant_every` while that is before `now`; every
/// `fail_every`-th granted host (i % fail_every == fail_every / 2) fails with an install error
/// 20 minutes after its grant, the others are healthy on the release 30 minutes after it.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub channel: String,
    pub old: String,
    pub release: String,
    pub hosts: usize,
    pub start: i64,
    pub now: i64,
    pub grant_after: i64,
    pub grant_every: i64,
    pub granted: usize,
    pub fail_every: usize,
}

impl FleetSpec {
    /// The fleet the browser and terminal tests show: 40 hosts on beta, the rollout of 2.0.0
    /// started 20 hours before `now`, a grant every 40 minutes from the first hour (24 granted),
    /// every 8th granted host failing: 21 updated, 3 failed.
    pub fn forty_hosts(now: i64) -> FleetSpec {
        FleetSpec {
            channel: "beta".into(),
            old: "1.0.0".into(),
            release: "2.0.0".into(),
            hosts: 40,
            start: now - 20 * 3600,
            now,
            grant_after: 3600,
            grant_every: 2400,
            granted: 24,
            fail_every: 8,
        }
    }
}

/// The rollout policy of [`FleetSpec::forty_hosts`] (`PUT /api/v1/rollouts/beta`): linear from
/// 10% to 100% over 24 hours (85% after 20 hours), halting above 25% failures of at least 5.
pub fn forty_hosts_policy() -> serde_json::Value {
    serde_json::json!({"policy": {"start_percent": 10, "ramp": {"kind": "linear", "duration_secs": 86400},
           "halt": {"max_failure_percent": 25, "min_reports": 5}}})
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct FleetFigures {
    pub updated: i64,
    pub failed: i64,
    pub granted: i64,
    pub history_rows: i64,
}

pub fn machine_id(i: usize) -> String {
    format!(
        "{:032x}",
        0x7e57_0000_0000_0000u64 as u128 * 1_000_003 + i as u128
    )
}

fn row(at: i64, m: &str, spec: &FleetSpec, version: &str, status: &str) -> HistoryRow {
    HistoryRow {
        at,
        machine_id: m.to_string(),
        channel: spec.channel.clone(),
        group: String::new(),
        version: Some(version.to_string()),
        target_version: Some(spec.release.clone()),
        status: status.to_string(),
        event_type: None,
        event_result: None,
        error_code: None,
    }
}

/// Writes the fleet; returns the figures the dashboard should show.
pub async fn seed(store: &Store, spec: &FleetSpec) -> FleetFigures {
    let mut figures = FleetFigures::default();
    let mut history = Vec::new();
    let mut instances = Vec::new();
    for i in 0..spec.hosts {
        let m = machine_id(i);
        let first_seen = spec.start + (i as i64 % 3600);
        let mut inst = InstanceRow::new(
            &m,
            "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}",
            &spec.channel,
            first_seen,
        );
        inst.version = Some(spec.old.clone());
        inst.board = Some("amd64-usr".to_string());
        inst.last_seen = spec.now - 60 - (i as i64 % 600);
        inst.checkins = 1;
        let tg = spec.start + spec.grant_after + i as i64 * spec.grant_every;
        if i < spec.granted && tg + 1800 < spec.now {
            figures.granted += 1;
            history.push(row(tg, &m, spec, &spec.old, "granted"));
            history.push(row(tg + 60, &m, spec, &spec.old, "downloading"));
            inst.target_version = Some(spec.release.clone());
            inst.granted_at = Some(tg);
            if spec.fail_every > 0 && i % spec.fail_every == spec.fail_every / 2 {
                figures.failed += 1;
                let mut r = row(tg + 1200, &m, spec, &spec.old, "error");
                r.error_code = Some(7);
                history.push(r);
                inst.status = "error".to_string();
                inst.error_code = Some(7);
                inst.outcome = Some("failure".to_string());
                inst.failed_version = Some(spec.release.clone());
                inst.outcome_at = Some((tg + 1200) * 1000);
            } else {
                figures.updated += 1;
                history.push(row(tg + 600, &m, spec, &spec.old, "installed"));
                history.push(row(tg + 1800, &m, spec, &spec.release, "complete"));
                inst.status = "complete".to_string();
                inst.version = Some(spec.release.clone());
                inst.outcome = Some("success".to_string());
                inst.outcome_at = Some((tg + 1800) * 1000);
            }
            inst.outcome_version = Some(spec.release.clone());
        }
        instances.push(inst);
    }
    history.sort_by_key(|h| h.at);
    figures.history_rows = history.len() as i64;
    for chunk in history.chunks(20_000) {
        let mut tx = store.begin().await.unwrap();
        store.insert_history_many(&mut tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
    for chunk in instances.chunks(20_000) {
        let mut tx = store.begin().await.unwrap();
        let refs: Vec<&InstanceRow> = chunk.iter().collect();
        store.upsert_instances(&mut tx, &refs).await.unwrap();
        tx.commit().await.unwrap();
    }
    // The rollout started at `start`, and the halt counts every outcome since.
    sqlx::query(
        "UPDATE rollouts SET started_at = $1, counts_since = $2 WHERE channel = $3 AND grp = ''",
    )
    .bind(spec.start)
    .bind(spec.start * 1000)
    .bind(&spec.channel)
    .execute(&store.pool)
    .await
    .unwrap();
    figures
}

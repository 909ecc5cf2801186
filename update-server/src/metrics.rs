//! `GET /metrics` in the Prometheus text format. Fleet numbers come from the database, so every
//! server process sharing one database reports the same fleet; counters are per process.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use anyhow::Result;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::policy;
use crate::server::{AppState, Shared};

pub async fn endpoint(State(s): State<Shared>) -> Response {
    match render(&s).await {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn render(s: &AppState) -> Result<String> {
    let mut out = String::new();
    let now = s.now();

    out.push_str("# HELP twinroot_hosts Hosts by channel, group, version and status.\n# TYPE twinroot_hosts gauge\n");
    for (l, n) in s
        .store
        .grouped_counts(
            "SELECT channel, grp, version, status, COUNT(*) AS n FROM instances GROUP BY channel, grp, version, status ORDER BY channel, grp, version, status",
            4,
        )
        .await?
    {
        let _ = writeln!(
            out,
            "twinroot_hosts{{channel=\"{}\",group=\"{}\",version=\"{}\",status=\"{}\"}} {n}",
            label(&l[0]),
            label(&l[1]),
            label(&l[2]),
            label(&l[3])
        );
    }

    out.push_str("# HELP twinroot_hosts_seen Hosts that checked in within the window.\n# TYPE twinroot_hosts_seen gauge\n");
    for (window, secs) in [("1h", 3600), ("1d", 86_400)] {
        let rows = s
            .store
            .grouped_counts(
                &format!(
                    "SELECT channel, COUNT(*) AS n FROM instances WHERE last_seen >= {} GROUP BY channel",
                    now - secs
                ),
                1,
            )
            .await?;
        for (l, n) in rows {
            let _ = writeln!(
                out,
                "twinroot_hosts_seen{{channel=\"{}\",window=\"{window}\"}} {n}",
                label(&l[0])
            );
        }
    }

    out.push_str("# HELP twinroot_update_failures Failed updates (errors and rollbacks) within the window.\n# TYPE twinroot_update_failures gauge\n");
    for (window, secs) in [("1h", 3600), ("1d", 86_400), ("7d", 7 * 86_400)] {
        for (l, n) in s.store.failures_since(now - secs).await? {
            let _ = writeln!(
                out,
                "twinroot_update_failures{{channel=\"{}\",group=\"{}\",window=\"{window}\"}} {n}",
                label(&l[0]),
                label(&l[1])
            );
        }
    }

    out.push_str("# HELP twinroot_rollout_percent Share of hosts currently eligible.\n# TYPE twinroot_rollout_percent gauge\n");
    out.push_str("# HELP twinroot_rollout_paused 1 when the rollout is paused; reason says why (automatic halts name the counts).\n# TYPE twinroot_rollout_paused gauge\n");
    let channels = s.store.channels().await?;
    for r in s.store.rollouts(None).await? {
        let release = r.policy.pin.clone().or_else(|| {
            channels
                .iter()
                .find(|c| c.name == r.channel)
                .and_then(|c| c.release_version.clone())
        });
        let _ = writeln!(
            out,
            "twinroot_rollout_percent{{channel=\"{}\",group=\"{}\",version=\"{}\"}} {}",
            label(&r.channel),
            label(&r.group),
            label(release.as_deref().unwrap_or("")),
            policy::rollout_percent(&r.policy, r.started_at, now)
        );
        let _ = writeln!(
            out,
            "twinroot_rollout_paused{{channel=\"{}\",group=\"{}\",automatic=\"{}\",reason=\"{}\"}} {}",
            label(&r.channel),
            label(&r.group),
            r.auto_halted,
            label(r.pause_reason.as_deref().unwrap_or("")),
            i64::from(r.paused)
        );
    }

    let c = &s.counters;
    for (name, help, v) in [
        (
            "twinroot_checkins_total",
            "Omaha requests received by this process (rate() gives the check-in rate).",
            &c.checkins,
        ),
        (
            "twinroot_grants_total",
            "Update offers sent by this process.",
            &c.grants,
        ),
        (
            "twinroot_events_total",
            "Omaha events recorded by this process.",
            &c.events,
        ),
        (
            "twinroot_bad_requests_total",
            "Omaha requests refused as malformed by this process.",
            &c.bad_requests,
        ),
        (
            "twinroot_automatic_halts_total",
            "Rollouts halted automatically by this process.",
            &c.halts,
        ),
        (
            "twinroot_checkins_from_memory_total",
            "App check-ins this process answered from its in-memory view, without its check-in writer (held hosts that only checked in; see docs/SERVER.md).",
            &c.from_memory,
        ),
        (
            "twinroot_history_rows_pruned_total",
            "Status history rows this process deleted because they were older than --history-days.",
            &c.history_pruned,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP twinroot_holds_total Update checks answered noupdate by this process, by reason.\n# TYPE twinroot_holds_total counter\n");
    if let Ok(holds) = c.holds.lock() {
        for (reason, n) in holds.iter() {
            let _ = writeln!(out, "twinroot_holds_total{{reason=\"{reason}\"}} {n}");
        }
    }
    Ok(out)
}

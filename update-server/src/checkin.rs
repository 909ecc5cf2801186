//! The Omaha endpoint's logic: one request in, one response out, all state changes committed in
//! one transaction per app before the response is written.

use anyhow::Result;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use semver::Version;
use twinroot_format::omaha::{
    self, Action, AppRequest, AppResponse, Package, Request, Response, UpdateCheckResponse,
    UpdateOffer, event_result, event_type,
};

use crate::policy::{self, Decision, Hold, HostView, ReleaseView, Rollout};
use crate::store::{HistoryRow, InstanceRow, ReleaseRow, Store, Tx};

/// Statuses of a host that has a grant and has not finished it.
pub fn is_in_flight(status: &str) -> bool {
    matches!(
        status,
        "granted" | "downloading" | "downloaded" | "installed"
    )
}

/// What the endpoint needs besides the database.
#[derive(Debug, Clone)]
pub struct OmahaConfig {
    /// The app id served (compared case-insensitively, braces included).
    pub app_id: String,
    /// Name sent in `<response server>`.
    pub server_name: String,
}

/// Outcome of a check-in, for metrics.
#[derive(Debug, Default, Clone)]
pub struct CheckinSummary {
    pub granted: u32,
    pub holds: Vec<&'static str>,
    pub halted: Vec<String>,
    pub events: u32,
}

/// Answers a parsed request. `codebase` is the payload URL prefix (ends with '/').
pub async fn handle(
    store: &Store,
    cfg: &OmahaConfig,
    req: &Request,
    codebase: &str,
    now: DateTime<Utc>,
) -> Result<(Response, CheckinSummary)> {
    let mut resp = Response {
        protocol: omaha::PROTOCOL_VERSION.to_string(),
        server: Some(cfg.server_name.clone()),
        daystart: Some(omaha::daystart_for(now.timestamp())),
        apps: Vec::new(),
    };
    let mut summary = CheckinSummary::default();
    for app in &req.apps {
        let mut out = AppResponse::ok(&app.app_id);
        out.events = app.events.len() as u32;
        out.ping = app.ping.is_some();
        if !app.app_id.eq_ignore_ascii_case(&cfg.app_id) {
            out.status = "error-unknownApplication".to_string();
            out.events = 0;
            out.ping = false;
            resp.apps.push(out);
            continue;
        }
        let machine_id = app.machine_id.as_deref().unwrap_or("").trim();
        if machine_id.is_empty() || machine_id.len() > 256 {
            // Nothing to record without a machine id; answer politely.
            if app.update_check.is_some() {
                out.update_check = Some(UpdateCheckResponse::NoUpdate);
            }
            resp.apps.push(out);
            continue;
        }
        summary.events += app.events.len() as u32;
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            match checkin_app(store, app, machine_id, codebase, now, &mut summary).await {
                Ok(a) => break a,
                // PostgreSQL may abort one of two crossing transactions; try again.
                Err(e) if attempt < 4 && store.backend == crate::store::Backend::Postgres => {
                    tracing::debug!(machine_id, error = %e, "retrying check-in transaction");
                }
                Err(e) => return Err(e),
            }
        };
        out.update_check = answer;
        resp.apps.push(out);
    }
    Ok((resp, summary))
}

fn parse_version(v: Option<&str>) -> Option<Version> {
    v.and_then(|v| Version::parse(v.trim()).ok())
}

async fn checkin_app(
    store: &Store,
    app: &AppRequest,
    machine_id: &str,
    codebase: &str,
    now: DateTime<Utc>,
    summary: &mut CheckinSummary,
) -> Result<Option<UpdateCheckResponse>> {
    let ts = now.timestamp();
    let channel = app
        .track
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or("stable")
        .chars()
        .take(64)
        .collect::<String>();
    let group: String = app.group_name().unwrap_or("").chars().take(64).collect();
    let mut tx = store.begin().await?;
    let channel_row = Store::channel_in(&mut tx, &channel).await?;
    let rollout_group = if Store::has_group_rollout(&mut tx, &channel, &group).await? {
        group.clone()
    } else {
        String::new()
    };
    let rollout = if channel_row.is_some() {
        store
            .rollout_locked(&mut tx, &channel, &rollout_group)
            .await?
    } else {
        None
    };
    let existing = Store::instance_in(&mut tx, machine_id).await?;
    let mut inst = existing.clone().unwrap_or_else(|| InstanceRow {
        machine_id: machine_id.to_string(),
        app_id: app.app_id.clone(),
        channel: channel.clone(),
        group: group.clone(),
        rollout_group: rollout_group.clone(),
        version: None,
        board: None,
        boot_id: None,
        status: "idle".to_string(),
        error_code: None,
        target_version: None,
        granted_at: None,
        outcome: None,
        outcome_version: None,
        outcome_at: None,
        failed_version: None,
        first_seen: ts,
        last_seen: ts,
        checkins: 0,
    });
    inst.app_id = app.app_id.clone();
    inst.channel = channel.clone();
    inst.group = group.clone();
    inst.rollout_group = rollout_group.clone();
    inst.version = app.version.clone().or(inst.version);
    inst.board = app.board.clone().or(inst.board);
    inst.boot_id = app.boot_id.clone().or(inst.boot_id);
    inst.last_seen = ts;
    inst.checkins += 1;
    let history = |inst: &InstanceRow, ev: Option<&omaha::Event>| HistoryRow {
        at: ts,
        machine_id: inst.machine_id.clone(),
        channel: inst.channel.clone(),
        group: inst.group.clone(),
        version: inst.version.clone(),
        target_version: inst.target_version.clone(),
        status: inst.status.clone(),
        event_type: ev.map(|e| i64::from(e.event_type)),
        event_result: ev.map(|e| i64::from(e.event_result)),
        error_code: ev.and_then(|e| e.error_code),
    };

    // A host that reports the version it was granted has completed the update.
    if is_in_flight(&inst.status)
        && inst.target_version.is_some()
        && inst.target_version == inst.version
        && app.events.is_empty()
    {
        inst.status = "complete".to_string();
        inst.outcome = Some("success".to_string());
        inst.outcome_version = inst.target_version.clone();
        inst.outcome_at = Some(now.timestamp_millis());
        Store::insert_history(&mut tx, &history(&inst, None)).await?;
    }

    // Events first: they change what the host's status is.
    let mut failure_versions = Vec::new();
    for ev in &app.events {
        apply_event(&mut inst, ev, now.timestamp_millis());
        if ev.is_failure()
            && let Some(v) = inst.outcome_version.clone()
        {
            failure_versions.push(v);
        }
        Store::insert_history(&mut tx, &history(&inst, Some(ev))).await?;
    }
    Store::upsert_instance(&mut tx, &inst).await?;

    // Automatic halt, judged right when a failure arrives.
    let mut rollout = rollout;
    if let Some(r) = rollout.as_mut()
        && !r.paused
    {
        for v in failure_versions {
            let counts = Store::counts(
                &mut tx,
                &channel,
                &rollout_group,
                &v,
                &r.policy,
                r.counts_since,
                ts,
            )
            .await?;
            if let Some(reason) = policy::halt_reason(r.policy.halt.as_ref(), &counts) {
                halt(&mut tx, &channel, &rollout_group, &v, &reason, ts).await?;
                summary.halted.push(channel.clone());
                r.paused = true;
                r.auto_halted = true;
                r.pause_reason = Some(reason);
                break;
            }
        }
    }

    let mut answer = None;
    if app.update_check.is_some() {
        let (update, changed) = match (&channel_row, &rollout) {
            (Some(ch), Some(r)) => {
                decide_update(&mut tx, app, &mut inst, ch, r, codebase, now, summary).await?
            }
            _ => {
                summary.holds.push("unknown_channel");
                (UpdateCheckResponse::NoUpdate, false)
            }
        };
        if changed {
            Store::upsert_instance(&mut tx, &inst).await?;
            Store::insert_history(&mut tx, &history(&inst, None)).await?;
        }
        answer = Some(update);
    }
    tx.commit().await?;
    Ok(answer)
}

/// Applies one event to the host's record.
fn apply_event(inst: &mut InstanceRow, ev: &omaha::Event, now_ms: i64) {
    let target = inst.target_version.clone().or(inst.version.clone());
    if ev.is_failure() {
        let rollback = ev.error_code == Some(omaha::error_code::ROLLBACK);
        inst.status = if rollback { "rolled_back" } else { "error" }.to_string();
        inst.error_code = ev.error_code;
        inst.outcome = Some("failure".to_string());
        inst.outcome_version = target.clone();
        inst.outcome_at = Some(now_ms);
        inst.failed_version = target;
        return;
    }
    match (ev.event_type, ev.event_result) {
        (event_type::DOWNLOAD_STARTED, _) => inst.status = "downloading".into(),
        (event_type::DOWNLOAD_FINISHED, _) => inst.status = "downloaded".into(),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS) => inst.status = "installed".into(),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS_REBOOT) => {
            inst.status = "complete".into();
            inst.error_code = None;
            inst.outcome = Some("success".to_string());
            inst.outcome_version = inst.version.clone().or(target);
            inst.outcome_at = Some(now_ms);
        }
        (_, event_result::DEFERRED) => inst.status = "deferred".into(),
        _ => {}
    }
}

async fn halt(
    tx: &mut Tx,
    channel: &str,
    group: &str,
    version: &str,
    reason: &str,
    now: i64,
) -> Result<()> {
    Store::set_paused(tx, channel, group, Some(reason), true).await?;
    Store::activity_in(
        tx,
        now,
        "rollout_halted",
        Some(channel),
        Some(group),
        Some(version),
        reason,
    )
    .await?;
    tracing::warn!(channel, group, version, reason, "rollout halted");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn decide_update(
    tx: &mut Tx,
    app: &AppRequest,
    inst: &mut InstanceRow,
    channel: &crate::store::ChannelRow,
    r: &crate::store::RolloutRow,
    codebase: &str,
    now: DateTime<Utc>,
    summary: &mut CheckinSummary,
) -> Result<(UpdateCheckResponse, bool)> {
    let ts = now.timestamp();
    let target = r
        .policy
        .pin
        .clone()
        .or_else(|| channel.release_version.clone());
    let Some(target) = target else {
        summary.holds.push("no_release");
        return Ok((UpdateCheckResponse::NoUpdate, false));
    };
    let Some(release) = Store::release_in(tx, &target).await? else {
        summary.holds.push("no_release");
        return Ok((UpdateCheckResponse::NoUpdate, false));
    };
    if let (Some(want), Some(have)) = (&release.board, &app.board)
        && want != have
    {
        summary.holds.push("wrong_board");
        return Ok((UpdateCheckResponse::NoUpdate, false));
    }
    let Ok(version) = Version::parse(&release.version) else {
        summary.holds.push("no_release");
        return Ok((UpdateCheckResponse::NoUpdate, false));
    };
    let rollout = Rollout {
        policy: r.policy.clone(),
        paused: if r.paused {
            Some(r.pause_reason.clone().unwrap_or_else(|| "paused".into()))
        } else {
            None
        },
        started_at: r.started_at,
    };
    let host = HostView {
        machine_id: inst.machine_id.clone(),
        version: parse_version(inst.version.as_deref()),
        failed_version: parse_version(inst.failed_version.as_deref()),
        in_flight_for_target: is_in_flight(&inst.status)
            && inst.target_version.as_deref() == Some(release.version.as_str())
            && inst
                .granted_at
                .is_some_and(|g| g > ts - r.policy.in_flight_timeout_secs),
    };
    let counts = Store::counts(
        tx,
        &r.channel,
        &r.group,
        &release.version,
        &r.policy,
        r.counts_since,
        ts,
    )
    .await?;
    let view = ReleaseView {
        version,
        salt: release.salt.clone(),
    };
    match policy::decide(&rollout, &view, &host, &counts, now) {
        Decision::Grant { renewed, .. } => {
            summary.granted += 1;
            let offer = offer_for(&release, codebase);
            if renewed {
                return Ok((UpdateCheckResponse::Ok(offer), false));
            }
            Store::insert_grant(
                tx,
                &inst.machine_id,
                &r.channel,
                &r.group,
                &release.version,
                ts,
            )
            .await?;
            inst.status = "granted".into();
            inst.target_version = Some(release.version.clone());
            inst.granted_at = Some(ts);
            inst.error_code = None;
            inst.outcome = None;
            inst.outcome_version = None;
            inst.outcome_at = None;
            Ok((UpdateCheckResponse::Ok(offer), true))
        }
        Decision::Hold(Hold::HaltTriggered(reason)) => {
            halt(tx, &r.channel, &r.group, &release.version, &reason, ts).await?;
            summary.halted.push(r.channel.clone());
            summary.holds.push("halted");
            Ok((UpdateCheckResponse::NoUpdate, false))
        }
        Decision::Hold(hold) => {
            summary.holds.push(hold.label());
            Ok((UpdateCheckResponse::NoUpdate, false))
        }
    }
}

/// The package name a release is served under: its SHA-256 plus `.bundle`.
pub fn package_name(release: &ReleaseRow) -> String {
    format!("{}.bundle", release.sha256)
}

/// The `<updatecheck status="ok">` contents for a release.
pub fn offer_for(release: &ReleaseRow, codebase: &str) -> UpdateOffer {
    let sha256_b64 = hex::decode(&release.sha256)
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .unwrap_or_default();
    UpdateOffer {
        urls: vec![codebase.to_string()],
        version: release.version.clone(),
        packages: vec![Package {
            name: package_name(release),
            size: release.size as u64,
            hash_sha1_base64: Some(release.sha1_base64.clone()),
            hash_sha256_hex: Some(release.sha256.clone()),
            required: true,
        }],
        actions: vec![Action {
            event: "postinstall".into(),
            sha256_base64: Some(sha256_b64),
            disable_payload_backoff: Some(true),
        }],
    }
}

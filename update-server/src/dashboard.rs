//! The rollout dashboard: JSON views for the pages (under `/api/v1/`, bearer token, any role) and
//! the pages themselves (under `/dashboard/`, static HTML, CSS and a small script of our own that
//! draws SVG charts from the JSON). Writes (pause, resume, promote) go through the admin API.
//! Open pages learn of changes from a server-sent event stream ([`live`]) and fall back to
//! polling when it is unavailable.

// Handlers return `Result<Response, Response>`: the error side is an HTTP answer, not a hot path.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::api::hash_token;
use crate::policy;
use crate::series::{self, ChannelSeries, Range};
use crate::server::{Shared, json_error};
use crate::store::{Store, TokenRole};

mod live;
mod slots;

pub use live::{LiveFeed, Marks, end_streams_on, read_marks};
pub use slots::{RebootSlots, reboot_slots};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

type ApiResult = Result<Response, Response>;

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "dashboard request failed");
    json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

trait OrInternal<T> {
    fn or_500(self) -> Result<T, Response>;
}

impl<T, E: Into<anyhow::Error>> OrInternal<T> for Result<T, E> {
    fn or_500(self) -> Result<T, Response> {
        self.map_err(|e| internal(e.into()))
    }
}

/// Routes to merge into the server's router: pages at `/dashboard/`, JSON under `/api/v1/`.
pub fn router(state: Shared) -> Router<Shared> {
    let api = Router::new()
        .route("/api/v1/series/{channel}", get(channel_view))
        .route("/api/v1/dashboard/overview", get(overview))
        .route("/api/v1/dashboard/instances", get(instances))
        .route("/api/v1/dashboard/releases/{version}", get(release_view))
        .route("/api/v1/dashboard/whoami", get(whoami))
        .route("/api/v1/dashboard/events", get(live::events))
        .layer(middleware::from_fn_with_state(state, auth));
    Router::new()
        .route(
            "/dashboard",
            get(|| async { Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .merge(api)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Any valid token may read.
async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer TOKEN)",
        );
    };
    match state.store.token_status(&hash_token(token)).await {
        Ok(Some(TokenRole::Active(_))) => next.run(req).await,
        Ok(Some(TokenRole::Revoked)) => json_error(
            StatusCode::UNAUTHORIZED,
            "this token was revoked; ask an operator for a new one",
        ),
        Ok(None) => json_error(StatusCode::UNAUTHORIZED, "unknown token"),
        Err(e) => internal(e),
    }
}

/// The role of the caller's token (the pages show write buttons to admins only).
async fn whoami(State(s): State<Shared>, headers: axum::http::HeaderMap) -> ApiResult {
    let token = bearer(&headers).unwrap_or_default();
    let role = s.store.token_role(&hash_token(token)).await.or_500()?;
    Ok(Json(serde_json::json!({ "role": role })).into_response())
}

// ---- rollout page ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct SeriesQuery {
    range: Option<String>,
}

/// Everything the rollout page and `watch` show for one channel.
#[derive(Debug, Serialize)]
pub struct ChannelView {
    pub channel: String,
    pub release: Option<String>,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub auto_halted: bool,
    pub current_percent: f64,
    /// Hosts on each version now.
    pub hosts: BTreeMap<String, i64>,
    pub total_hosts: i64,
    /// Hosts on the release now.
    pub updated_hosts: i64,
    /// Outcomes the automatic halt counts now (since the release or the last resume).
    pub halt_failures: i64,
    pub halt_reports: i64,
    pub halt_failure_percent: Option<f64>,
    pub halt_threshold_percent: Option<f64>,
    pub halt_min_reports: Option<u64>,
    pub activity: Vec<crate::store::ActivityRow>,
    /// Reboot slots in use at the coordinator (`serve --coordinator`).
    pub reboot_slots: RebootSlots,
    pub series: serde_json::Value,
}

async fn channel_view(
    State(s): State<Shared>,
    Path(channel): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> ApiResult {
    let range = Range::parse(q.range.as_deref().unwrap_or("day"))
        .map_err(|e| json_error(StatusCode::BAD_REQUEST, e))?;
    let now = s.now();
    let (view, slots) = tokio::join!(
        build_channel_view(&s.store, &channel, range, now),
        reboot_slots(s.coordinator.as_ref())
    );
    match view.or_500()? {
        Some(mut v) => {
            v.reboot_slots = slots;
            Ok(Json(v).into_response())
        }
        None => Err(json_error(
            StatusCode::NOT_FOUND,
            format!("channel {channel} does not exist"),
        )),
    }
}

/// Builds the view of one channel over `range` ending at `now`; `None` if there is no such
/// channel. The reboot slots are left `NotConfigured` (the handler asks the coordinator).
pub async fn build_channel_view(
    store: &Store,
    channel: &str,
    range: Range,
    now: i64,
) -> Result<Option<ChannelView>> {
    let caught_up = series::catch_up(store, now).await?;
    let channels = store.channels().await?;
    let Some(ch) = channels.iter().find(|c| c.name == channel) else {
        return Ok(None);
    };
    let rollout = store
        .rollouts(Some(channel))
        .await?
        .into_iter()
        .find(|r| r.group.is_empty());
    let release = rollout
        .as_ref()
        .and_then(|r| r.policy.pin.clone())
        .or(ch.release_version.clone());
    let s: ChannelSeries = series::channel_series(
        store,
        channel,
        range,
        now,
        release.as_deref(),
        rollout.as_ref().map(|r| (&r.policy, r.started_at)),
    )
    .await?;
    let hosts = series::hosts_per_version(store)
        .await?
        .remove(channel)
        .unwrap_or_default();
    let total_hosts = hosts.values().sum();
    let updated_hosts = release
        .as_ref()
        .and_then(|r| hosts.get(r))
        .copied()
        .unwrap_or(0);
    let (hf, hr) = match (&rollout, &release) {
        (Some(r), Some(rel)) => halt_counts(store, caught_up, r, rel, now).await?,
        _ => (0, 0),
    };
    let activity = channel_activity(store, channel, s.from, 50).await?;
    let halt = rollout.as_ref().and_then(|r| r.policy.halt.clone());
    Ok(Some(ChannelView {
        channel: channel.to_string(),
        release,
        paused: rollout.as_ref().is_some_and(|r| r.paused),
        pause_reason: rollout.as_ref().and_then(|r| r.pause_reason.clone()),
        auto_halted: rollout.as_ref().is_some_and(|r| r.auto_halted),
        current_percent: rollout.as_ref().map_or(0.0, |r| {
            policy::rollout_percent(&r.policy, r.started_at, now)
        }),
        hosts,
        total_hosts,
        updated_hosts,
        halt_failures: hf,
        halt_reports: hr,
        halt_failure_percent: series::failure_percent(hf, hr - hf),
        halt_threshold_percent: halt.as_ref().map(|h| h.max_failure_percent),
        halt_min_reports: halt.as_ref().map(|h| h.min_reports),
        activity,
        reboot_slots: RebootSlots::NotConfigured,
        series: serde_json::to_value(&s)?,
    }))
}

/// How long halt counts may be reused while new history arrives.
const HALT_COUNTS_REUSE: std::time::Duration = std::time::Duration::from_secs(2);

/// (database, channel, release, counts since).
type HaltKey = (i64, String, String, i64);
/// (history cursor, computed at, failures, reports).
type HaltCounts = (i64, Instant, i64, i64);
static HALT_COUNTS: std::sync::Mutex<Option<HashMap<HaltKey, HaltCounts>>> =
    std::sync::Mutex::new(None);

/// (failures, reports) as the automatic halt counts them: the rollout's own query over
/// `instances`, which walks every host with an outcome for the release (~40 ms at 100,000 hosts
/// on SQLite). Reused while no history was written (every outcome change writes history), and
/// for up to [`HALT_COUNTS_REUSE`] while it is.
async fn halt_counts(
    store: &Store,
    caught_up: series::CaughtUp,
    r: &crate::store::RolloutRow,
    release: &str,
    now: i64,
) -> Result<(i64, i64)> {
    let key = (
        caught_up.database_id,
        r.channel.clone(),
        release.to_string(),
        r.counts_since,
    );
    if let Some((cursor, at, f, n)) = HALT_COUNTS
        .lock()
        .expect("halt count cache")
        .get_or_insert_with(HashMap::new)
        .get(&key)
        && (*cursor == caught_up.history_cursor || at.elapsed() < HALT_COUNTS_REUSE)
    {
        return Ok((*f, *n));
    }
    let mut tx = store.begin().await?;
    let counts = Store::counts(
        &mut tx,
        &r.channel,
        "",
        release,
        &r.policy,
        r.counts_since,
        now,
    )
    .await?;
    tx.commit().await?;
    let f = counts.failures as i64;
    let n = (counts.failures + counts.successes) as i64;
    HALT_COUNTS
        .lock()
        .expect("halt count cache")
        .get_or_insert_with(HashMap::new)
        .insert(key, (caught_up.history_cursor, Instant::now(), f, n));
    Ok((f, n))
}

async fn channel_activity(
    store: &Store,
    channel: &str,
    since: i64,
    limit: i64,
) -> Result<Vec<crate::store::ActivityRow>> {
    let rows = sqlx::query(
        "SELECT id, at, kind, channel, grp, version, message FROM activity WHERE channel = $1 AND at >= $2 ORDER BY at DESC, id DESC LIMIT $3",
    )
    .bind(channel)
    .bind(since)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    crate::store::activity_rows(&rows)
}

// ---- fleet overview ----------------------------------------------------------------------------

#[derive(Serialize)]
struct ChannelSummary {
    name: String,
    release: Option<String>,
    current_percent: f64,
    paused: bool,
    pause_reason: Option<String>,
    auto_halted: bool,
    hosts: BTreeMap<String, i64>,
    total_hosts: i64,
    updated_hosts: i64,
    failures: i64,
    successes: i64,
    failure_percent: Option<f64>,
    halt_threshold_percent: Option<f64>,
}

async fn overview(State(s): State<Shared>) -> ApiResult {
    let now = s.now();
    series::catch_up(&s.store, now).await.or_500()?;
    let channels = s.store.channels().await.or_500()?;
    let rollouts = s.store.rollouts(None).await.or_500()?;
    let mut hosts = series::hosts_per_version(&s.store).await.or_500()?;
    let outcomes = series::outcome_totals(&s.store).await.or_500()?;
    let mut out = Vec::new();
    for c in channels {
        let r = rollouts
            .iter()
            .find(|r| r.channel == c.name && r.group.is_empty());
        let release = r
            .and_then(|r| r.policy.pin.clone())
            .or(c.release_version.clone());
        let h = hosts.remove(&c.name).unwrap_or_default();
        let (failures, successes) = release
            .as_ref()
            .and_then(|v| outcomes.get(&(c.name.clone(), v.clone())))
            .copied()
            .unwrap_or((0, 0));
        out.push(ChannelSummary {
            current_percent: r.map_or(0.0, |r| {
                policy::rollout_percent(&r.policy, r.started_at, now)
            }),
            paused: r.is_some_and(|r| r.paused),
            pause_reason: r.and_then(|r| r.pause_reason.clone()),
            auto_halted: r.is_some_and(|r| r.auto_halted),
            total_hosts: h.values().sum(),
            updated_hosts: release
                .as_ref()
                .and_then(|v| h.get(v))
                .copied()
                .unwrap_or(0),
            hosts: h,
            failures,
            successes,
            failure_percent: series::failure_percent(failures, successes),
            halt_threshold_percent: r
                .and_then(|r| r.policy.halt.as_ref())
                .map(|h| h.max_failure_percent),
            name: c.name,
            release,
        });
    }
    Ok(Json(serde_json::json!({ "channels": out, "now": now })).into_response())
}

// ---- instances ---------------------------------------------------------------------------------

#[derive(Deserialize)]
struct InstanceQuery {
    q: Option<String>,
    channel: Option<String>,
    version: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
}

#[derive(Serialize)]
struct InstanceSummary {
    machine_id: String,
    channel: String,
    group: String,
    version: Option<String>,
    status: String,
    target_version: Option<String>,
    error_code: Option<i64>,
    last_seen: i64,
}

/// `%` and `_` match themselves in the search text.
fn like_pattern(q: &str) -> String {
    let escaped = q
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// The instance list counts matches exactly up to this many, then says "more than".
pub const INSTANCE_COUNT_CAP: i64 = 10_000;

async fn instances(State(s): State<Shared>, Query(q): Query<InstanceQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let offset = q.offset.unwrap_or(0).max(0);
    let search = q.q.as_deref().unwrap_or("").trim().to_string();
    // Only the filters given go into the query, so each can use its index (status: the
    // dashboard's own `dash_instances_status`); a substring search scans machine ids in order.
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    for (cond, value) in [
        ("channel = ", q.channel.clone().unwrap_or_default()),
        ("version = ", q.version.clone().unwrap_or_default()),
        ("status = ", q.status.clone().unwrap_or_default()),
    ] {
        if !value.is_empty() {
            conds.push(cond);
            args.push(value);
        }
    }
    if !search.is_empty() {
        conds.push("machine_id LIKE ");
        args.push(like_pattern(&search));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = conds
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let escape = if c.contains("LIKE") {
                    " ESCAPE '\\'"
                } else {
                    ""
                };
                format!("{c}${}{escape}", i + 1)
            })
            .collect();
        format!("WHERE {}", parts.join(" AND "))
    };
    let bind = |sql: String| {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for a in &args {
            query = query.bind(a.clone());
        }
        query
    };
    let counted: i64 = bind(format!(
        "SELECT COUNT(*) AS n FROM (SELECT 1 FROM instances {filter} LIMIT {}) AS matches",
        INSTANCE_COUNT_CAP + 1
    ))
    .fetch_one(&s.store.pool)
    .await
    .or_500()?
    .try_get("n")
    .or_500()?;
    let n = args.len();
    let rows = bind(format!(
        "SELECT machine_id, channel, grp, version, status, target_version, error_code, last_seen FROM instances {filter} ORDER BY machine_id LIMIT ${} OFFSET ${}",
        n + 1,
        n + 2
    ))
    .bind(limit)
    .bind(offset)
    .fetch_all(&s.store.pool)
    .await
    .or_500()?;
    let rows: Vec<InstanceSummary> = rows
        .iter()
        .map(|r| {
            Ok(InstanceSummary {
                machine_id: r.try_get("machine_id")?,
                channel: r.try_get("channel")?,
                group: r.try_get("grp")?,
                version: r.try_get("version")?,
                status: r.try_get("status")?,
                target_version: r.try_get("target_version")?,
                error_code: r.try_get("error_code")?,
                last_seen: r.try_get("last_seen")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .or_500()?;
    Ok(Json(serde_json::json!({
        "total": counted.min(INSTANCE_COUNT_CAP),
        "total_capped": counted > INSTANCE_COUNT_CAP,
        "rows": rows,
    }))
    .into_response())
}

// ---- release page ------------------------------------------------------------------------------

async fn release_view(State(s): State<Shared>, Path(version): Path<String>) -> ApiResult {
    let now = s.now();
    series::catch_up(&s.store, now).await.or_500()?;
    let Some(mut release) = s.store.release(&version).await.or_500()? else {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!("release {version} does not exist"),
        ));
    };
    let channels = s.store.channels().await.or_500()?;
    release.channels = channels
        .iter()
        .filter(|c| c.release_version.as_deref() == Some(version.as_str()))
        .map(|c| c.name.clone())
        .collect();
    let promotions = sqlx::query(
        "SELECT channel, forced, at FROM promotions WHERE version = $1 ORDER BY at, id",
    )
    .bind(&version)
    .fetch_all(&s.store.pool)
    .await
    .or_500()?
    .iter()
    .map(|r| {
        Ok(serde_json::json!({
            "channel": r.try_get::<String, _>("channel")?,
            "forced": r.try_get::<i64, _>("forced")? != 0,
            "at": r.try_get::<i64, _>("at")?,
        }))
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()
    .or_500()?;
    let activity = sqlx::query(
        "SELECT id, at, kind, channel, grp, version, message FROM activity WHERE version = $1 ORDER BY at DESC, id DESC LIMIT 100",
    )
    .bind(&version)
    .fetch_all(&s.store.pool)
    .await
    .or_500()?;
    let activity = crate::store::activity_rows(&activity).or_500()?;
    let hosts: BTreeMap<String, i64> = series::hosts_per_version(&s.store)
        .await
        .or_500()?
        .into_iter()
        .filter_map(|(c, m)| m.get(&version).map(|n| (c, *n)))
        .collect();
    Ok(Json(serde_json::json!({
        "release": release,
        "promotions": promotions,
        "activity": activity,
        "hosts_per_channel": hosts,
    }))
    .into_response())
}

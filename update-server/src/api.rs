//! Admin REST API under `/api/v1/`: bearer tokens (stored hashed), roles admin and viewer.

// Handlers return `Result<Response, Response>`: the error side is an HTTP answer, not a hot path.
#![allow(clippy::result_large_err)]

use anyhow::Result;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::policy::{self, RolloutPolicy};
use crate::release::{self, UploadDigests};
use crate::server::{MAX_JSON_BODY, Shared, json_error};
use crate::store::{
    self, INSTANCE_PAGE_MAX, InstanceFilter, LIFT_QUARANTINE_SECS, LiftRow, ReleaseRow, Role,
    STATUSES, Store, TokenRole,
};

/// SHA-256 hex of a token, the form it is stored in.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (`trt_` + 64 hex characters).
pub fn new_token() -> Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    Ok(format!("trt_{}", hex::encode(b)))
}

/// Creates a token and stores its hash.
pub async fn create_token(store: &Store, role: Role, name: &str) -> Result<String> {
    let token = new_token()?;
    store
        .insert_token(
            &hash_token(&token),
            role,
            name,
            chrono::Utc::now().timestamp(),
        )
        .await?;
    Ok(token)
}

pub fn router(state: Shared) -> Router<Shared> {
    let authed = Router::new()
        .route(
            "/releases",
            get(list_releases)
                .post(upload_release)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/releases/{version}", get(get_release))
        .route("/releases/{version}/promote", post(promote))
        .route("/channels", get(list_channels).post(create_channel))
        .route("/rollouts", get(list_rollouts))
        .route("/rollouts/{channel}", get(show_rollout).put(set_rollout))
        .route("/rollouts/{channel}/pause", post(pause))
        .route("/rollouts/{channel}/resume", post(resume))
        .route("/instances", get(list_instances))
        .route("/instances/{machine_id}/history", get(instance_history))
        .route(
            "/instances/{machine_id}/lift-quarantine",
            post(lift_quarantine),
        )
        .route("/activity", get(list_activity))
        .route("/timeline", get(timeline))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::from_fn_with_state(state, auth));
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(authed)
}

async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return unauthorized("missing bearer token (Authorization: Bearer TOKEN)");
    };
    let role = match state.store.token_status(&hash_token(token)).await {
        Ok(Some(TokenRole::Active(r))) => r,
        Ok(Some(TokenRole::Revoked)) => {
            return unauthorized("this token was revoked; ask an operator for a new one");
        }
        Ok(None) => return unauthorized("unknown token"),
        Err(e) => return internal(e),
    };
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read_only && role != Role::Admin {
        return json_error(
            StatusCode::FORBIDDEN,
            "this token has the viewer role; writes need an admin token",
        );
    }
    next.run(req).await
}

fn unauthorized(msg: &str) -> Response {
    let mut r = json_error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
    r
}

fn internal(e: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "admin API request failed");
    json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

type ApiResult = Result<Response, Response>;

fn ok_json<T: serde::Serialize>(v: &T) -> ApiResult {
    Ok(Json(v).into_response())
}

trait OrInternal<T> {
    fn or_500(self) -> Result<T, Response>;
}

impl<T> OrInternal<T> for Result<T> {
    fn or_500(self) -> Result<T, Response> {
        self.map_err(internal)
    }
}

// ---- releases -----------------------------------------------------------------------------------

async fn list_releases(State(s): State<Shared>) -> ApiResult {
    ok_json(&s.store.releases().await.or_500()?)
}

async fn get_release(State(s): State<Shared>, Path(version): Path<String>) -> ApiResult {
    match s.store.release(&version).await.or_500()? {
        Some(r) => ok_json(&r),
        None => Err(json_error(
            StatusCode::NOT_FOUND,
            format!("release {version} does not exist"),
        )),
    }
}

async fn upload_release(State(s): State<Shared>, body: Body) -> ApiResult {
    let Some(keyring) = s.keyring.clone() else {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no keyring (start it with --keyring FILE) and accepts no releases",
        ));
    };
    let dir = release::upload_dir(&s.config.data_dir);
    let tmp = dir.join(format!(
        "upload-{}",
        &api_random_suffix().map_err(internal)?
    ));
    let result = receive_and_store(&s, body, &tmp, keyring).await;
    let _ = tokio::fs::remove_file(&tmp).await;
    result
}

fn api_random_suffix() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(b))
}

async fn receive_and_store(
    s: &Shared,
    body: Body,
    tmp: &std::path::Path,
    keyring: twinroot_format::keyring::Keyring,
) -> ApiResult {
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| internal(anyhow::anyhow!("cannot create {}: {e}", tmp.display())))?;
    let mut digests = UploadDigests::default();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| json_error(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")))?;
        digests.update(&chunk);
        if digests.size > s.config.max_upload_bytes {
            return Err(json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "upload exceeds the limit of {} bytes",
                    s.config.max_upload_bytes
                ),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| internal(anyhow::anyhow!("cannot write upload: {e}")))?;
    }
    file.sync_all()
        .await
        .map_err(|e| internal(anyhow::anyhow!("cannot sync upload: {e}")))?;
    drop(file);
    let size = digests.size;
    let (sha256, sha1_base64) = digests.finish();
    let path = tmp.to_path_buf();
    let verified = tokio::task::spawn_blocking(move || release::verify_bundle(&path, &keyring))
        .await
        .map_err(|e| internal(anyhow::anyhow!("verification task failed: {e}")))?
        .map_err(|e| {
            json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("bundle rejected: {e}"),
            )
        })?;
    if let Some(existing) = s.store.release(&verified.version).await.or_500()? {
        if existing.sha256 == sha256 {
            return Ok((StatusCode::OK, Json(existing)).into_response());
        }
        return Err(json_error(
            StatusCode::CONFLICT,
            format!(
                "release {} already exists with different contents (sha256 {})",
                verified.version, existing.sha256
            ),
        ));
    }
    let dest = release::blob_path(&s.config.data_dir, &sha256);
    tokio::fs::rename(tmp, &dest)
        .await
        .map_err(|e| internal(anyhow::anyhow!("cannot store {}: {e}", dest.display())))?;
    let now = s.now();
    let row = ReleaseRow {
        version: verified.version.clone(),
        sha256,
        sha1_base64,
        size: size as i64,
        salt: api_random_suffix().map_err(internal)?,
        board: verified.board,
        min_source_version: verified.min_source_version,
        created_unix: verified.created_unix,
        uploaded_at: now,
        channels: Vec::new(),
    };
    s.store.insert_release(&row).await.or_500()?;
    let mut tx = s.store.begin().await.or_500()?;
    Store::activity_in(
        &mut tx,
        now,
        "release_uploaded",
        None,
        None,
        Some(&row.version),
        &format!(
            "release {} uploaded (sha256 {}, {} bytes, signed by {})",
            row.version,
            row.sha256,
            row.size,
            verified.signers.join(", ")
        ),
    )
    .await
    .or_500()?;
    tx.commit().await.map_err(|e| internal(e.into()))?;
    Ok((StatusCode::CREATED, Json(row)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    channel: String,
    #[serde(default)]
    force: bool,
}

async fn promote(
    State(s): State<Shared>,
    Path(version): Path<String>,
    Json(body): Json<PromoteBody>,
) -> ApiResult {
    let now = s.now();
    // Read before the transaction: on SQLite the pool has one connection, which the
    // transaction holds.
    let channels = s.store.channels().await.or_500()?;
    let mut tx = s.store.begin().await.or_500()?;
    if Store::release_in(&mut tx, &version)
        .await
        .or_500()?
        .is_none()
    {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!("release {version} does not exist; upload it first"),
        ));
    }
    let Some(channel) = Store::channel_in(&mut tx, &body.channel).await.or_500()? else {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!("channel {} does not exist", body.channel),
        ));
    };
    let previous = channels
        .iter()
        .filter(|c| c.position < channel.position)
        .max_by_key(|c| c.position);
    if let Some(prev) = previous
        && !body.force
        && !Store::was_promoted_to(&mut tx, &version, &prev.name)
            .await
            .or_500()?
    {
        return Err(json_error(
            StatusCode::CONFLICT,
            format!(
                "release {version} has not been on {} yet; promote it there first, or force the skip",
                prev.name
            ),
        ));
    }
    sqlx::query("UPDATE channels SET release_version = $1, promoted_at = $2 WHERE name = $3")
        .bind(&version)
        .bind(now)
        .bind(&channel.name)
        .execute(&mut *tx)
        .await
        .map_err(|e| internal(e.into()))?;
    sqlx::query("INSERT INTO promotions (version, channel, forced, at) VALUES ($1, $2, $3, $4)")
        .bind(&version)
        .bind(&channel.name)
        .bind(i64::from(body.force))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| internal(e.into()))?;
    // A new release starts its rollouts afresh; an automatic halt belonged to the old release.
    sqlx::query("UPDATE rollouts SET started_at = $1, counts_since = $1 * 1000, paused = CASE WHEN auto_halted = 1 THEN 0 ELSE paused END, pause_reason = CASE WHEN auto_halted = 1 THEN NULL ELSE pause_reason END, auto_halted = 0 WHERE channel = $2")
        .bind(now)
        .bind(&channel.name)
        .execute(&mut *tx)
        .await
        .map_err(|e| internal(e.into()))?;
    let msg = format!(
        "release {version} promoted to {}{}",
        channel.name,
        if body.force {
            " (forced, skipping the channel order)"
        } else {
            ""
        }
    );
    Store::activity_in(
        &mut tx,
        now,
        "release_promoted",
        Some(&channel.name),
        None,
        Some(&version),
        &msg,
    )
    .await
    .or_500()?;
    commit_config_change(tx, &s).await?;
    ok_json(
        &serde_json::json!({ "channel": channel.name, "version": version, "forced": body.force }),
    )
}

async fn list_channels(State(s): State<Shared>) -> ApiResult {
    ok_json(&s.store.channels().await.or_500()?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateChannelBody {
    name: String,
    /// The channel it comes after in the promotion order.
    after: String,
}

/// Adds a channel to the promotion order, right after `after`.
async fn create_channel(State(s): State<Shared>, Json(body): Json<CreateChannelBody>) -> ApiResult {
    store::validate_channel_name(&body.name)
        .map_err(|e| json_error(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let now = s.now();
    let mut tx = s.store.begin().await.or_500()?;
    if Store::channel_in(&mut tx, &body.name)
        .await
        .or_500()?
        .is_some()
    {
        return Err(json_error(
            StatusCode::CONFLICT,
            format!("channel {} already exists", body.name),
        ));
    }
    let Some(after) = Store::channel_in(&mut tx, &body.after).await.or_500()? else {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!(
                "channel {} (the one {} should follow) does not exist",
                body.after, body.name
            ),
        ));
    };
    let position = Store::create_channel(&mut tx, &body.name, &after, now)
        .await
        .or_500()?;
    Store::activity_in(
        &mut tx,
        now,
        "channel_created",
        Some(&body.name),
        None,
        None,
        &format!(
            "channel {} created after {} in the promotion order",
            body.name, after.name
        ),
    )
    .await
    .or_500()?;
    commit_config_change(tx, &s).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"name": body.name, "position": position, "after": after.name})),
    )
        .into_response())
}

// ---- rollouts -----------------------------------------------------------------------------------

#[derive(Deserialize)]
struct GroupQuery {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    channel: Option<String>,
}

async fn list_rollouts(State(s): State<Shared>, Query(q): Query<GroupQuery>) -> ApiResult {
    ok_json(
        &rollouts_with_percent(&s, q.channel.as_deref())
            .await
            .or_500()?,
    )
}

async fn rollouts_with_percent(
    s: &Shared,
    channel: Option<&str>,
) -> Result<Vec<serde_json::Value>> {
    let now = s.now();
    let channels = s.store.channels().await?;
    Ok(s.store
        .rollouts(channel)
        .await?
        .into_iter()
        .map(|r| {
            let release = channels
                .iter()
                .find(|c| c.name == r.channel)
                .and_then(|c| c.release_version.clone());
            let percent = policy::rollout_percent(&r.policy, r.started_at, now);
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            v["current_percent"] = serde_json::json!(percent);
            v["release_version"] = serde_json::json!(r.policy.pin.clone().or(release));
            v
        })
        .collect())
}

async fn show_rollout(
    State(s): State<Shared>,
    Path(channel): Path<String>,
    Query(q): Query<GroupQuery>,
) -> ApiResult {
    let group = q.group.unwrap_or_default();
    let all = rollouts_with_percent(&s, Some(&channel)).await.or_500()?;
    match all.into_iter().find(|r| r["group"] == group.as_str()) {
        Some(r) => ok_json(&r),
        None => Err(json_error(
            StatusCode::NOT_FOUND,
            format!("no rollout for channel {channel:?} group {group:?}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRolloutBody {
    #[serde(default)]
    group: Option<String>,
    policy: RolloutPolicy,
}

async fn set_rollout(
    State(s): State<Shared>,
    Path(channel): Path<String>,
    Json(body): Json<SetRolloutBody>,
) -> ApiResult {
    body.policy.validate().map_err(|e| {
        json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid policy: {e}"),
        )
    })?;
    let group = body.group.unwrap_or_default();
    if group.len() > 64 {
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "group name longer than 64",
        ));
    }
    let now = s.now();
    let mut tx = s.store.begin().await.or_500()?;
    let Some(ch) = Store::channel_in(&mut tx, &channel).await.or_500()? else {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!("channel {channel} does not exist"),
        ));
    };
    if let Some(pin) = &body.policy.pin
        && Store::release_in(&mut tx, pin).await.or_500()?.is_none()
    {
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("pinned release {pin} does not exist"),
        ));
    }
    let started = ch.promoted_at.unwrap_or(now);
    Store::upsert_rollout_policy(&mut tx, &channel, &group, &body.policy, started)
        .await
        .or_500()?;
    let policy_json = serde_json::to_string(&body.policy).unwrap_or_default();
    Store::activity_in(
        &mut tx,
        now,
        "rollout_set",
        Some(&channel),
        Some(&group),
        body.policy.pin.as_deref(),
        &format!(
            "rollout policy for {channel}{} set: {policy_json}",
            group_suffix(&group)
        ),
    )
    .await
    .or_500()?;
    commit_config_change(tx, &s).await?;
    rollout_answer(s, channel, group).await
}

/// The rollout of `channel` (and `group`) as `GET /rollouts/{channel}` shows it.
async fn rollout_answer(s: Shared, channel: String, group: String) -> ApiResult {
    let query = GroupQuery {
        group: Some(group),
        channel: None,
    };
    show_rollout(State(s), Path(channel), Query(query)).await
}

/// Commits an admin change to channels, rollouts or lifts, telling the check-in writer to read
/// them again.
async fn commit_config_change(tx: crate::store::Tx, s: &Shared) -> Result<(), Response> {
    s.store.config_changed();
    tx.commit().await.map_err(|e| internal(e.into()))
}

fn group_suffix(group: &str) -> String {
    if group.is_empty() {
        String::new()
    } else {
        format!(" group {group}")
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

async fn pause(
    State(s): State<Shared>,
    Path(channel): Path<String>,
    body: Option<Json<PauseBody>>,
) -> ApiResult {
    let body = body.map(|b| b.0).unwrap_or_default();
    set_pause(s, channel, body, true).await
}

async fn resume(
    State(s): State<Shared>,
    Path(channel): Path<String>,
    body: Option<Json<PauseBody>>,
) -> ApiResult {
    let body = body.map(|b| b.0).unwrap_or_default();
    set_pause(s, channel, body, false).await
}

async fn set_pause(s: Shared, channel: String, body: PauseBody, paused: bool) -> ApiResult {
    let group = body.group.unwrap_or_default();
    let now = s.now();
    let reason = body
        .reason
        .unwrap_or_else(|| "paused by an operator".to_string());
    let mut tx = s.store.begin().await.or_500()?;
    let changed = Store::set_paused(
        &mut tx,
        &channel,
        &group,
        paused.then_some(reason.as_str()),
        false,
    )
    .await
    .or_500()?;
    if changed && !paused {
        // Failures before the resume were judged already; count afresh from here.
        let now_ms = s.now_millis() + 1;
        Store::reset_counts_since(&mut tx, &channel, &group, now_ms)
            .await
            .or_500()?;
    }
    if !changed {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!("no rollout for channel {channel:?} group {group:?}"),
        ));
    }
    let (kind, msg) = if paused {
        (
            "rollout_paused",
            format!("rollout {channel}{} paused: {reason}", group_suffix(&group)),
        )
    } else {
        (
            "rollout_resumed",
            format!("rollout {channel}{} resumed", group_suffix(&group)),
        )
    };
    Store::activity_in(&mut tx, now, kind, Some(&channel), Some(&group), None, &msg)
        .await
        .or_500()?;
    commit_config_change(tx, &s).await?;
    rollout_answer(s, channel, group).await
}

// ---- instances and activity -------------------------------------------------------------------

#[derive(Deserialize)]
struct InstanceQuery {
    channel: Option<String>,
    version: Option<String>,
    group: Option<String>,
    status: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// Hosts, filtered and paged. A full page carries `X-Next-After`: the machine id to pass as
/// `after` for the next page.
async fn list_instances(State(s): State<Shared>, Query(q): Query<InstanceQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(INSTANCE_PAGE_MAX);
    if !(1..=INSTANCE_PAGE_MAX).contains(&limit) {
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit must be between 1 and {INSTANCE_PAGE_MAX}, got {limit}"),
        ));
    }
    if let Some(status) = q.status.as_deref()
        && !STATUSES.contains(&status)
    {
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "status {status:?} is not a host status; use one of {}",
                STATUSES.join(", ")
            ),
        ));
    }
    let filter = InstanceFilter {
        channel: q.channel.as_deref(),
        version: q.version.as_deref(),
        group: q.group.as_deref(),
        status: q.status.as_deref(),
        after: q.after.as_deref(),
        limit,
    };
    let hosts = s.store.instances(&filter).await.or_500()?;
    let next = (hosts.len() == limit as usize)
        .then(|| hosts.last().map(|h| h.machine_id.clone()))
        .flatten();
    let mut response = ok_json(&hosts)?;
    if let Some(next) = next
        && let Ok(value) = header::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert(NEXT_AFTER, value);
    }
    Ok(response)
}

/// Response header of a full `instances` page: the `after` of the next page.
pub const NEXT_AFTER: &str = "x-next-after";

async fn instance_history(State(s): State<Shared>, Path(machine_id): Path<String>) -> ApiResult {
    ok_json(&s.store.history(&machine_id).await.or_500()?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LiftBody {
    version: String,
}

/// Lets a host install a release it failed again: clears the server's quarantine of it and
/// tells the host's agent (in its next Omaha answers) to drop its own.
async fn lift_quarantine(
    State(s): State<Shared>,
    Path(machine_id): Path<String>,
    Json(body): Json<LiftBody>,
) -> ApiResult {
    let version = body.version.trim().to_string();
    if let Err(e) = semver::Version::parse(&version) {
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("version {version:?} is not a release version: {e}"),
        ));
    }
    let now_ms = s.now_millis();
    let now = now_ms.div_euclid(1000);
    let mut tx = s.store.begin().await.or_500()?;
    let Some(host) = Store::instance_in(&mut tx, &machine_id).await.or_500()? else {
        return Err(json_error(
            StatusCode::NOT_FOUND,
            format!(
                "host {machine_id} has never checked in with this server; check the machine id (update-server instances)"
            ),
        ));
    };
    // Strictly after the host's last outcome, so a failure recorded in the same millisecond
    // as the lift (or later) is told apart from the one the lift forgives.
    let lifted_at_ms = now_ms.max(host.outcome_at.map_or(i64::MIN, |t| t + 1));
    let lift = LiftRow {
        machine_id: machine_id.clone(),
        version: version.clone(),
        lifted_at_ms,
        expires_at: now + LIFT_QUARANTINE_SECS,
    };
    Store::lift_quarantine(&mut tx, &lift).await.or_500()?;
    Store::activity_in(
        &mut tx,
        now,
        "quarantine_lifted",
        Some(&host.channel),
        Some(&host.group),
        Some(&version),
        &format!(
            "quarantine of release {version} lifted for host {machine_id}{}",
            if host.failed_version.as_deref() == Some(version.as_str()) {
                " (it had failed it)"
            } else {
                ""
            }
        ),
    )
    .await
    .or_500()?;
    commit_config_change(tx, &s).await?;
    ok_json(&lift)
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
}

async fn list_activity(State(s): State<Shared>, Query(q): Query<LimitQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    ok_json(&s.store.activity(limit).await.or_500()?)
}

#[derive(Deserialize)]
struct TimelineQuery {
    since: Option<i64>,
    bucket_secs: Option<i64>,
    channel: Option<String>,
}

async fn timeline(State(s): State<Shared>, Query(q): Query<TimelineQuery>) -> ApiResult {
    let now = s.now();
    let rows = s
        .store
        .status_timeline(
            q.since.unwrap_or(now - 86_400),
            q.bucket_secs.unwrap_or(3600).clamp(60, 86_400 * 31),
            q.channel.as_deref(),
        )
        .await
        .or_500()?;
    let out: Vec<_> = rows
        .into_iter()
        .map(|(bucket, channel, status, count)| {
            serde_json::json!({"bucket": bucket, "channel": channel, "status": status, "count": count})
        })
        .collect();
    ok_json(&out)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document().to_string(),
    )
        .into_response()
}

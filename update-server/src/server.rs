//! The HTTP server: Omaha endpoint, payloads, admin API, metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use twinroot_format::keyring::Keyring;
use twinroot_format::omaha;

use crate::checkin::{self, Checkins, OmahaConfig};
use crate::clock::ServerClock;
use crate::store::Store;
use crate::{api, metrics, payload, release};

/// Largest Omaha request body accepted.
pub const MAX_OMAHA_BODY: usize = 64 * 1024;
/// Largest JSON body accepted by the admin API.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Defaults to `sqlite://DATA_DIR/server.db`.
    pub database_url: Option<String>,
    /// Uploads are refused without one.
    pub keyring: Option<PathBuf>,
    pub app_id: String,
    /// Serve payloads from here (a CDN or object store holding `SHA256.bundle` files) instead of
    /// from this server.
    pub payload_base_url: Option<String>,
    /// This server's public URL, for payload URLs (default: from the request's Host header).
    pub public_url: Option<String>,
    /// Largest bundle upload accepted.
    pub max_upload_bytes: u64,
    /// How much faster than the wall clock the server's clock runs (1.0 = real time).
    pub time_scale: f64,
    /// How long a check-in that changes nothing but the host's `last_seen` and `checkins` may
    /// wait before those are written ([`crate::seen`]; at most [`crate::seen::MAX_DELAY`]).
    pub seen_delay: std::time::Duration,
    /// Most host records kept for answering held hosts without the check-in writer
    /// ([`crate::fast`]; 0: every check-in goes to the writer).
    pub cached_hosts: usize,
    /// Base URL of the FleetLock reboot coordinator the fleet uses, if any (shown on the
    /// dashboard).
    pub coordinator: Option<reqwest::Url>,
    /// Days of status history kept (server time); older rows are deleted every hour. 0 keeps
    /// everything.
    pub history_days: u32,
}

/// Default of `serve --history-days`: three times the dashboard's longest range (30 days).
pub const DEFAULT_HISTORY_DAYS: u32 = 90;

/// Rows deleted per statement when pruning history, and the pause between statements.
const PRUNE_CHUNK: i64 = 5_000;
const PRUNE_PAUSE_MS: u64 = 20;

/// Parses `--coordinator`: an http(s) base URL.
pub fn parse_coordinator_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s.trim())
        .map_err(|e| format!("coordinator URL {s:?} is invalid: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "coordinator URL {s:?} must be http:// or https:// with a host"
        ));
    }
    Ok(url)
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            data_dir,
            database_url: None,
            keyring: None,
            app_id: omaha::FLATCAR_APP_ID.to_string(),
            payload_base_url: None,
            public_url: None,
            max_upload_bytes: 16 << 30,
            time_scale: 1.0,
            seen_delay: crate::seen::DEFAULT_DELAY,
            cached_hosts: crate::fast::DEFAULT_CACHED_HOSTS,
            coordinator: None,
            history_days: DEFAULT_HISTORY_DAYS,
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("server.db").display()
            )
        })
    }
}

/// Process-local counters (the fleet's numbers come from the database).
#[derive(Default)]
pub struct Counters {
    pub checkins: AtomicU64,
    pub grants: AtomicU64,
    pub events: AtomicU64,
    pub bad_requests: AtomicU64,
    pub halts: AtomicU64,
    /// App check-ins answered on the HTTP threads without the check-in writer.
    pub from_memory: AtomicU64,
    /// Status history rows deleted by `--history-days`.
    pub history_pruned: AtomicU64,
    /// Update checks answered `noupdate`, by reason.
    pub holds: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

pub struct AppState {
    pub store: Store,
    pub checkins: Checkins,
    pub config: ServerConfig,
    pub keyring: Option<Keyring>,
    pub omaha: OmahaConfig,
    pub counters: Counters,
    /// The clock every time-dependent decision reads (see [`ServerClock`]).
    pub clock: ServerClock,
    /// Base URL of the FleetLock reboot coordinator (`serve --coordinator`).
    pub coordinator: Option<reqwest::Url>,
    /// The dashboard's live-update feed.
    pub live: crate::dashboard::LiveFeed,
}

impl AppState {
    /// The server's now, Unix seconds (virtual time when `--time-scale` is not 1).
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The server's now, Unix milliseconds.
    pub fn now_millis(&self) -> i64 {
        self.clock.now_millis()
    }

    /// The server's now as a date.
    pub fn now_utc(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now_utc()
    }
}

pub type Shared = Arc<AppState>;

/// Opens the store and keyring for a configuration.
pub async fn open_state(config: ServerConfig) -> Result<Shared> {
    crate::clock::validate_scale(config.time_scale)?;
    if config.seen_delay > crate::seen::MAX_DELAY {
        bail!(
            "the delay for writing check-ins ({} ms) is longer than the {} ms allowed",
            config.seen_delay.as_millis(),
            crate::seen::MAX_DELAY.as_millis()
        );
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    release::ensure_dirs(&config.data_dir)?;
    let store = Store::open(&config.database_url()).await?;
    let mut start_ms = chrono::Utc::now().timestamp_millis();
    if config.time_scale != 1.0 {
        // A sped-up server resumes its virtual time where the database's records end, so its
        // clock never runs backwards across a restart.
        let latest = store.latest_record_time().await?.unwrap_or(0);
        start_ms = start_ms.max(latest.saturating_add(1).saturating_mul(1000));
    }
    let clock = ServerClock::starting_at(start_ms, config.time_scale)?;
    let keyring = match &config.keyring {
        Some(p) => {
            Some(Keyring::load(p).with_context(|| format!("cannot load keyring {}", p.display()))?)
        }
        None => None,
    };
    Ok(Arc::new(AppState {
        checkins: Checkins::start(store.clone(), config.seen_delay, config.cached_hosts)?,
        store,
        omaha: OmahaConfig {
            app_id: config.app_id.clone(),
            server_name: "twinroot-update-server".to_string(),
        },
        coordinator: config.coordinator.clone(),
        config,
        keyring,
        counters: Counters::default(),
        clock,
        live: Default::default(),
    }))
}

pub fn router(state: Shared) -> Router {
    let omaha_routes = Router::new()
        .route("/v1/update/", post(omaha_endpoint))
        .route("/v1/update", post(omaha_endpoint))
        .layer(DefaultBodyLimit::max(MAX_OMAHA_BODY));
    Router::new()
        .merge(omaha_routes)
        .route(
            "/v1/payload/{name}",
            get(payload::serve).head(payload::serve),
        )
        .route("/metrics", get(metrics::endpoint))
        .route("/healthz", get(healthz))
        .nest("/api/v1", api::router(state.clone()))
        .merge(crate::dashboard::router(state.clone()))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn run(listener: TcpListener, state: Shared, shutdown: CancellationToken) -> Result<()> {
    crate::dashboard::end_streams_on(&state, shutdown.clone());
    tokio::spawn(prune_history(state.clone(), shutdown.clone()));
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("HTTP server failed")
}

/// Keeps `--history-days` of status history: prunes at start and then every hour of server
/// time (sooner in real time under `--time-scale`) until `shutdown`. Chunks are deleted with
/// a pause between them, so even a large backlog (a first start with years of history) leaves
/// the check-in writer its turns at the database. A failed pass is logged and retried at the
/// next one.
async fn prune_history(state: Shared, shutdown: CancellationToken) {
    let days = state.config.history_days;
    if days == 0 {
        return;
    }
    let every =
        std::time::Duration::from_secs_f64((3600.0 / state.clock.scale()).clamp(0.05, 3600.0));
    let pause = std::time::Duration::from_millis(PRUNE_PAUSE_MS);
    loop {
        let before = state.now() - i64::from(days) * 86_400;
        let mut pass = 0;
        loop {
            match state.store.prune_history(before, PRUNE_CHUNK).await {
                Ok(n) => {
                    pass += n;
                    state
                        .counters
                        .history_pruned
                        .fetch_add(n, Ordering::Relaxed);
                    if n < PRUNE_CHUNK as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "pruning status history failed");
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if pass > 0 {
            tracing::info!(
                rows = pass,
                days,
                "pruned status history older than the retention"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `ok` while check-ins can be recorded; 503 once the check-in writer has ended (a stop, or a
/// bug), so a supervisor or load balancer takes the process out instead of letting it answer
/// every host with an error.
async fn healthz(State(state): State<Shared>) -> Response {
    if state.checkins.is_running() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "check-in writer stopped: this server records no check-ins\n",
        )
            .into_response()
    }
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The payload URL prefix for this request.
pub fn codebase(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(base) = &state.config.payload_base_url {
        return with_slash(base);
    }
    let public = match &state.config.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                })
                .unwrap_or("localhost");
            format!("http://{host}")
        }
    };
    format!("{public}/v1/payload/")
}

fn with_slash(s: &str) -> String {
    if s.ends_with('/') {
        s.to_string()
    } else {
        format!("{s}/")
    }
}

async fn omaha_endpoint(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    state.counters.checkins.fetch_add(1, Ordering::Relaxed);
    let req = match omaha::Request::parse(&body) {
        Ok(r) => r,
        Err(e) => {
            state.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
            return xml_error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let base = codebase(&state, &headers);
    match checkin::handle(&state.checkins, &state.omaha, req, &base, state.now_utc()).await {
        Ok((resp, summary)) => {
            let c = &state.counters;
            c.grants
                .fetch_add(u64::from(summary.granted), Ordering::Relaxed);
            c.events
                .fetch_add(u64::from(summary.events), Ordering::Relaxed);
            c.halts
                .fetch_add(summary.halted.len() as u64, Ordering::Relaxed);
            c.from_memory
                .fetch_add(u64::from(summary.from_memory), Ordering::Relaxed);
            if !summary.holds.is_empty()
                && let Ok(mut holds) = c.holds.lock()
            {
                for h in &summary.holds {
                    *holds.entry(h).or_default() += 1;
                }
            }
            xml_response(StatusCode::OK, resp.to_xml())
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "check-in failed");
            xml_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server could not record this check-in; retry later",
            )
        }
    }
}

fn xml_error(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<error>{}</error>\n",
        quick_escape(message)
    );
    xml_response(status, body)
}

fn quick_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A JSON error body `{"error": "..."}` with a status.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

pub fn empty(status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .body(Body::empty())
        .expect("static response")
}

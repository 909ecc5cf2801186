//! The FleetLock HTTP server (axum).

use crate::etcd_store::EtcdStore;
use crate::metrics::Metrics;
use crate::semaphore::{AcquireError, Acquired, Refusal, Semaphore, StoreError};
use crate::window::WindowSet;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use twinroot_format::coordinator_status::{self, CoordinatorStatus, GroupSlots};
use twinroot_format::fleetlock::{
    self, ErrorBody, ErrorKind, PROTOCOL_HEADER, PROTOCOL_HEADER_VALUE, Request,
};

/// Source of the current time (UTC unix seconds) for reboot windows.
pub trait Clock: Send + Sync {
    fn now_unix_seconds(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_seconds(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock stuck at one instant (tests, simulations).
pub struct FixedClock(pub u64);

impl Clock for FixedClock {
    fn now_unix_seconds(&self) -> u64 {
        self.0
    }
}

/// HTTP-side settings.
pub struct ServerConfig {
    /// Reboot windows per group; groups not listed may reboot at any time.
    pub windows: HashMap<String, WindowSet>,
    /// When set, FleetLock requests must carry `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    pub clock: Box<dyn Clock>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            windows: HashMap::new(),
            bearer_token: None,
            clock: Box::new(SystemClock),
        }
    }
}

/// Everything a request handler needs.
pub struct Coordinator {
    pub semaphore: Semaphore<EtcdStore>,
    pub config: ServerConfig,
    pub metrics: Metrics,
}

/// A FleetLock failure answer.
struct Failure(ErrorKind, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(ErrorBody::new(self.0, self.1))).into_response()
    }
}

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route(
            fleetlock::PRE_REBOOT_PATH,
            post(pre_reboot).fallback(method_not_allowed),
        )
        .route(
            fleetlock::STEADY_STATE_PATH,
            post(steady_state).fallback(method_not_allowed),
        )
        .route("/metrics", get(metrics))
        .route(coordinator_status::STATUS_PATH, get(status))
        .fallback(not_found)
        .with_state(coordinator)
}

/// Serves until `shutdown` fires, then finishes the requests in flight.
pub async fn run(
    listener: tokio::net::TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(coordinator))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// TLS material for [`run_tls`]: PEM certificate chain and private key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Like [`run`], over HTTPS (rustls with the ring provider).
pub async fn run_tls(
    listener: std::net::TcpListener,
    coordinator: Arc<Coordinator>,
    tls: &TlsFiles,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Ignore the error: another part of the process may have installed a provider already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "loading TLS certificate {} and key {}: {e}",
                    tls.cert.display(),
                    tls.key.display()
                ),
            )
        })?;
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
        });
    }
    axum_server::from_tcp_rustls(listener, config)?
        .handle(handle)
        .serve(router(coordinator).into_make_service())
        .await
}

async fn not_found(State(c): State<Arc<Coordinator>>, uri: axum::http::Uri) -> Response {
    let failure = Failure(
        ErrorKind::NotFound,
        format!(
            "no route {}; FleetLock routes are POST {} and POST {}",
            uri.path(),
            fleetlock::PRE_REBOOT_PATH,
            fleetlock::STEADY_STATE_PATH
        ),
    );
    finish(&c, Err(failure))
}

async fn method_not_allowed(
    State(c): State<Arc<Coordinator>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    let failure = Failure(
        ErrorKind::MethodNotAllowed,
        format!("{} {} is not allowed; use POST", method, uri.path()),
    );
    finish(&c, Err(failure))
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> Response {
    let groups = match c.semaphore.store().groups().await {
        Ok(g) => Some(g),
        Err(e) => {
            Metrics::inc(&c.metrics.etcd_errors);
            tracing::warn!(error = %e, "metrics: could not read groups");
            None
        }
    };
    let text = c.metrics.render(
        groups.as_deref(),
        c.semaphore.config().default_slots,
        c.semaphore.conflicts(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /v1/status`: slots per group (always including the default group) and how many are held,
/// as JSON (read-only; no host ids, so like `/metrics` it needs no token). 503 with a FleetLock error body when etcd cannot be read.
async fn status(State(c): State<Arc<Coordinator>>) -> Response {
    let default_slots = c.semaphore.config().default_slots;
    match c.semaphore.store().groups().await {
        Ok(groups) => {
            let mut groups: Vec<GroupSlots> = groups
                .into_iter()
                .map(|g| GroupSlots {
                    slots: g.slots.unwrap_or(default_slots),
                    in_use: g.holders.len() as u32,
                    group: g.group,
                })
                .collect();
            // Hosts without a group of their own use the default group, which etcd lists only
            // once it has a count or a holder.
            if !groups.iter().any(|g| g.group == fleetlock::DEFAULT_GROUP) {
                groups.push(GroupSlots {
                    group: fleetlock::DEFAULT_GROUP.to_string(),
                    slots: default_slots,
                    in_use: 0,
                });
            }
            axum::Json(CoordinatorStatus {
                default_slots,
                groups,
            })
            .into_response()
        }
        Err(e) => {
            Metrics::inc(&c.metrics.etcd_errors);
            Failure(
                ErrorKind::EtcdUnavailable,
                format!("cannot read the reboot groups from etcd: {e}"),
            )
            .into_response()
        }
    }
}

/// Checks auth, the protocol header and the body; the error is the answer to send.
fn parse_request(c: &Coordinator, headers: &HeaderMap, body: &[u8]) -> Result<Request, Failure> {
    if let Some(token) = &c.config.bearer_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return Err(Failure(
                ErrorKind::Unauthorized,
                "missing or wrong bearer token in the Authorization header".into(),
            ));
        }
    }
    let header_ok = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(PROTOCOL_HEADER_VALUE));
    if !header_ok {
        return Err(Failure(
            ErrorKind::MissingProtocolHeader,
            format!("header \"{PROTOCOL_HEADER}: {PROTOCOL_HEADER_VALUE}\" is required"),
        ));
    }
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        Failure(
            ErrorKind::BadRequest,
            format!(
                "body is not a FleetLock request {{\"client_params\":{{\"id\":...,\"group\":...}}}}: {e}"
            ),
        )
    })?;
    req.validate()
        .map_err(|e| Failure(e.kind(), e.to_string()))?;
    Ok(req)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn store_failure(c: &Coordinator, e: StoreError) -> Failure {
    Metrics::inc(&c.metrics.etcd_errors);
    let kind = match e {
        StoreError::Unavailable { .. } => ErrorKind::EtcdUnavailable,
        StoreError::Failed { .. } | StoreError::Corrupt { .. } => ErrorKind::EtcdError,
        StoreError::Invalid(_) => ErrorKind::Internal,
    };
    Failure(kind, format!("{e}; no reboot slot was granted or released"))
}

fn finish(c: &Coordinator, result: Result<(), Failure>) -> Response {
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(f) => {
            c.metrics.refused(f.0);
            f.into_response()
        }
    }
}

async fn pre_reboot(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req = parse_request(&c, &headers, &body)?;
        let p = &req.client_params;
        let open = c
            .config
            .windows
            .get(&p.group)
            .is_none_or(|w| w.is_open(c.config.clock.now_unix_seconds()));
        match c.semaphore.acquire(&p.group, &p.id, open).await {
            Ok(Acquired::Granted) => {
                Metrics::inc(&c.metrics.grants);
                tracing::info!(group = %p.group, id = %p.id, "reboot slot granted");
                Ok(())
            }
            Ok(Acquired::Renewed) => {
                Metrics::inc(&c.metrics.renewals);
                tracing::debug!(group = %p.group, id = %p.id, "reboot slot renewed");
                Ok(())
            }
            Err(AcquireError::Refused(r @ (Refusal::NoSlot { .. } | Refusal::Lowered { .. }))) => {
                Err(Failure(ErrorKind::NoSlotAvailable, r.to_string()))
            }
            Err(AcquireError::Refused(Refusal::NewGrantsClosed { group })) => {
                let windows = c.config.windows.get(&group).cloned().unwrap_or_default();
                Err(Failure(
                    ErrorKind::OutsideRebootWindow,
                    format!("group {group} may only start reboots during {windows}, retry later"),
                ))
            }
            Err(e @ AcquireError::Contention { .. }) => {
                Err(Failure(ErrorKind::NoSlotAvailable, e.to_string()))
            }
            Err(AcquireError::Store(e)) => Err(store_failure(&c, e)),
        }
    }
    .await;
    finish(&c, result)
}

async fn steady_state(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let req = parse_request(&c, &headers, &body)?;
        let p = &req.client_params;
        match c.semaphore.release(&p.group, &p.id).await {
            Ok(true) => {
                Metrics::inc(&c.metrics.releases);
                tracing::info!(group = %p.group, id = %p.id, "reboot slot released");
                Ok(())
            }
            Ok(false) => {
                Metrics::inc(&c.metrics.releases_not_held);
                Ok(())
            }
            Err(e) => Err(store_failure(&c, e)),
        }
    }
    .await;
    finish(&c, result)
}

//! Live updates for the dashboard: `GET /api/v1/dashboard/events`, a server-sent event stream
//! that says "something changed" within [`POLL`] of a check-in, an event, a pause or a promotion.
//!
//! One poller per server (started by the first open stream, stopped with the last) reads a few
//! change marks ([`Marks`]: the newest history row, activity row and check-in time, a digest
//! of the channels and rollouts, and one of the reboot slots in use) and publishes them on a `watch` channel; every stream forwards
//! each new value as a `change` event. The page then re-reads the JSON of what it shows, so the
//! stream carries no view of its own and needs no per-page logic. Streams end when the server
//! shuts down ([`end_streams_on`]), so a graceful shutdown does not wait for open dashboards.

use std::collections::hash_map::DefaultHasher;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use sqlx::Row;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::server::{AppState, Shared};

/// How often the poller reads the marks.
pub const POLL: Duration = Duration::from_secs(1);

/// What the dashboard's data depends on; any change of a field is news.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Marks {
    /// Newest `status_history` id (every change of a host's status writes one).
    pub history: i64,
    /// Newest `activity` id (promotions, pauses, resumes, halts).
    pub activity: i64,
    /// Newest check-in time (a host seen, with or without news).
    pub seen: i64,
    /// Digest of the channels and rollouts (releases, policies, pause states).
    pub config: u64,
    /// Digest of the reboot slots seen at the coordinator.
    pub slots: u64,
}

/// Reads the marks: three index lookups, the two small configuration tables and the reboot
/// coordinator's (cached) status.
pub async fn read_marks(state: &AppState) -> Result<Marks> {
    let store = &state.store;
    let r = sqlx::query(
        "SELECT (SELECT COALESCE(MAX(id), 0) FROM status_history) AS history, (SELECT COALESCE(MAX(id), 0) FROM activity) AS activity, (SELECT COALESCE(MAX(last_seen), 0) FROM instances) AS seen",
    )
    .fetch_one(&store.pool)
    .await?;
    let mut digest = DefaultHasher::new();
    serde_json::to_string(&store.channels().await?)?.hash(&mut digest);
    serde_json::to_string(&store.rollouts(None).await?)?.hash(&mut digest);
    let mut slots = DefaultHasher::new();
    serde_json::to_string(&super::reboot_slots(state.coordinator.as_ref()).await)?.hash(&mut slots);
    Ok(Marks {
        history: r.try_get("history")?,
        activity: r.try_get("activity")?,
        seen: r.try_get("seen")?,
        config: digest.finish(),
        slots: slots.finish(),
    })
}

/// A server's live feed (a field of [`AppState`]): the marks channel while a poller runs, and
/// the token that ends the server's streams.
#[derive(Default)]
pub struct LiveFeed {
    inner: Mutex<FeedInner>,
}

#[derive(Default)]
struct FeedInner {
    marks: Option<watch::Receiver<Marks>>,
    shutdown: CancellationToken,
}

impl LiveFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedInner> {
        self.inner.lock().expect("dashboard feed")
    }
}

/// Ends this server's event streams when `shutdown` is cancelled (the server calls this with the
/// token of its graceful shutdown).
pub fn end_streams_on(state: &Shared, shutdown: CancellationToken) {
    let own = state.live.lock().shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => own.cancel(),
            _ = own.cancelled() => {}
        }
    });
}

/// A receiver of this server's marks (starting its poller if none runs) and its stop token.
fn subscribe(state: &Shared) -> (watch::Receiver<Marks>, CancellationToken) {
    let mut feed = state.live.lock();
    if let Some(rx) = &feed.marks {
        return (rx.clone(), feed.shutdown.clone());
    }
    let (tx, rx) = watch::channel(Marks::default());
    feed.marks = Some(rx.clone());
    // The poller holds the server weakly: it does not keep a stopped server alive.
    tokio::spawn(poll(Arc::downgrade(state), tx));
    (rx, feed.shutdown.clone())
}

async fn poll(state: Weak<AppState>, tx: watch::Sender<Marks>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = state.upgrade() else { return };
        {
            // The feed's own receiver is the last one: nobody listens, stop (under the lock, so
            // no stream subscribes to a poller that is leaving).
            let mut feed = s.live.lock();
            if tx.receiver_count() <= 1 {
                feed.marks = None;
                return;
            }
        }
        match read_marks(&s).await {
            Ok(m) => {
                tx.send_if_modified(|cur| {
                    let news = *cur != m;
                    *cur = m;
                    news
                });
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "dashboard: cannot read change marks")
            }
        }
    }
}

fn event(name: &str, marks: Marks) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(name)
        .json_data(marks)
        .unwrap_or_else(|_| Event::default().event(name)))
}

/// `GET /api/v1/dashboard/events`: `hello` with the current marks, then `change` with the new
/// marks whenever they move; a comment every 15 s keeps proxies from closing the stream.
pub async fn events(State(s): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (rx, stop) = subscribe(&s);
    let stream =
        futures_util::stream::unfold((rx, stop, true), |(mut rx, stop, first)| async move {
            if first {
                let m = *rx.borrow_and_update();
                return Some((event("hello", m), (rx, stop, false)));
            }
            tokio::select! {
                changed = rx.changed() => {
                    changed.ok()?;
                    let m = *rx.borrow_and_update();
                    Some((event("change", m), (rx, stop, false)))
                }
                _ = stop.cancelled() => None,
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

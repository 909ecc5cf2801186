//! Reboot slots in use, from the reboot coordinator given by `serve --coordinator URL` (its
//! `GET /v1/status`, [`twinroot_format::coordinator_status`]).
//!
//! Answers are kept for [`FRESH`]; an older one is still served while a single background request
//! renews it, so a slow or unreachable coordinator never holds up a page (only the very first
//! read of a coordinator waits, at most [`TIMEOUT`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use twinroot_format::coordinator_status::{CoordinatorStatus, GroupSlots, STATUS_PATH};
use twinroot_format::fleetlock::ErrorBody;

/// How long an answer is served without asking again.
pub const FRESH: Duration = Duration::from_secs(2);
/// How long a status request may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// What the rollout page and `watch` show about reboot slots.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RebootSlots {
    /// The server was started without `--coordinator`.
    NotConfigured,
    /// The coordinator could not be reached or answered with an error.
    Unavailable { coordinator: String, error: String },
    /// Slots held now over all groups, and per group.
    Known {
        coordinator: String,
        in_use: u32,
        total: u32,
        groups: Vec<GroupSlots>,
    },
}

struct Cached {
    at: Instant,
    value: RebootSlots,
    renewing: bool,
}

static CACHE: Mutex<Option<HashMap<String, Cached>>> = Mutex::new(None);

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        crate::http_client_builder()
            .timeout(TIMEOUT)
            .build()
            .expect("an HTTP client with a timeout always builds")
    })
}

/// Asks the coordinator at `base` for its status.
pub async fn fetch(base: &str) -> RebootSlots {
    let url = format!("{}{STATUS_PATH}", base.trim_end_matches('/'));
    let unavailable = |error: String| RebootSlots::Unavailable {
        coordinator: base.to_string(),
        error,
    };
    let resp = match client().get(&url).send().await {
        Ok(r) => r,
        Err(e) => return unavailable(format!("cannot reach {url}: {:#}", anyhow::Error::from(e))),
    };
    let status = resp.status();
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => return unavailable(format!("{url}: {:#}", anyhow::Error::from(e))),
    };
    if !status.is_success() {
        let why = serde_json::from_str::<ErrorBody>(&body)
            .map(|e| e.value)
            .unwrap_or(body);
        return unavailable(format!("{url} answered {status}: {}", why.trim()));
    }
    match serde_json::from_str::<CoordinatorStatus>(&body) {
        Ok(s) => {
            let (in_use, total) = s.totals();
            RebootSlots::Known {
                coordinator: base.to_string(),
                in_use,
                total,
                groups: s.groups,
            }
        }
        Err(e) => unavailable(format!("{url}: not a coordinator status: {e}")),
    }
}

/// The reboot slots as last seen at `coordinator` (see the module comment for freshness).
pub async fn reboot_slots(coordinator: Option<&reqwest::Url>) -> RebootSlots {
    let Some(url) = coordinator else {
        return RebootSlots::NotConfigured;
    };
    let key = url.as_str().trim_end_matches('/').to_string();
    {
        let mut cache = CACHE.lock().expect("reboot slot cache");
        if let Some(c) = cache.get_or_insert_with(HashMap::new).get_mut(&key) {
            if c.at.elapsed() >= FRESH && !c.renewing {
                c.renewing = true;
                let key = key.clone();
                tokio::spawn(async move {
                    let value = fetch(&key).await;
                    remember(key, value);
                });
            }
            return c.value.clone();
        }
    }
    let value = fetch(&key).await;
    remember(key, value.clone());
    value
}

fn remember(key: String, value: RebootSlots) {
    CACHE
        .lock()
        .expect("reboot slot cache")
        .get_or_insert_with(HashMap::new)
        .insert(
            key,
            Cached {
                at: Instant::now(),
                value,
                renewing: false,
            },
        );
}

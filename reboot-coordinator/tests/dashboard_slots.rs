//! The coordinator's status endpoint and the update-server's rollout page showing its reboot
//! slots: a real `reboot-coordinator serve` process on a real etcd, and an update-server in this
//! process started with `--coordinator` (its `ServerConfig::coordinator`). The page keeps working
//! when the coordinator goes away, and says so; without a coordinator it says none is configured.
//!
//! (This test lives here because it needs this crate's binary and etcd harness; update-server's
//! tests cannot build another crate's binary.)

mod common;

use std::time::Duration;

use common::{CoordinatorProcess, fleetlock, http};
use reboot_coordinator::testing::EtcdCluster;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use twinroot_format::coordinator_status::{CoordinatorStatus, GroupSlots, STATUS_PATH};
use update_server::server::{self, ServerConfig};
use update_server::store::Role;

/// An update-server in this process.
struct UpdateServer {
    url: String,
    token: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl UpdateServer {
    async fn start(coordinator: Option<&str>) -> UpdateServer {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::new(dir.path().join("data"));
        cfg.coordinator = coordinator.map(|c| server::parse_coordinator_url(c).unwrap());
        let state = server::open_state(cfg).await.unwrap();
        let token = update_server::api::create_token(&state.store, Role::Viewer, "test")
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(server::run(listener, state, shutdown.clone()));
        UpdateServer {
            url,
            token,
            shutdown,
            _dir: dir,
        }
    }

    /// The rollout page's view of channel stable.
    async fn view(&self, client: &reqwest::Client) -> Value {
        let resp = client
            .get(format!("{}/api/v1/series/stable?range=hour", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            200,
            "the rollout page must keep working"
        );
        resp.json().await.unwrap()
    }

    /// Waits until the view's reboot slots satisfy `pred`: reads the view, and again after each
    /// `change` event of the dashboard's live stream (its change marks include the slots, so
    /// every change of them is announced).
    async fn slots_until(
        &self,
        client: &reqwest::Client,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut events = client
            .get(format!("{}/api/v1/dashboard/events", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(events.status().as_u16(), 200);
        let mut buf = String::new();
        // After `hello`, any change of the slots comes as an event: none can be missed.
        next_event(&mut events, &mut buf).await;
        let mut last = Value::Null;
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let v = self.view(client).await;
                if pred(&v["reboot_slots"]) {
                    return v;
                }
                last = v["reboot_slots"].clone();
                next_event(&mut events, &mut buf).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("timed out waiting for {what}; reboot_slots = {last}"))
    }
}

/// The next named event of a server-sent event stream (keep-alive comments are skipped).
async fn next_event(resp: &mut reqwest::Response, buf: &mut String) -> String {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if event.lines().any(|l| l.starts_with("event:")) {
                return event;
            }
            continue;
        }
        let chunk = resp
            .chunk()
            .await
            .unwrap()
            .expect("the dashboard's event stream ended");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn status(client: &reqwest::Client, base: &str) -> (u16, String) {
    let resp = client
        .get(format!("{base}{STATUS_PATH}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_page_shows_reboot_slots_in_use_from_a_real_coordinator() {
    let mut etcd = EtcdCluster::start_single().await;
    let mut coordinator = CoordinatorProcess::spawn(
        &etcd.endpoints(),
        &["--default-slots", "2", "--group", "db=1"],
    );
    let client = http();

    // The status endpoint: the default group always, plus groups with a slot count or a holder
    // ("db" once serve has seeded its count); none held yet.
    let (st, body) = status(&client, &coordinator.url).await;
    assert_eq!(st, 200, "{body}");
    let s: CoordinatorStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(s.default_slots, 2);
    assert!(
        s.groups.contains(&GroupSlots {
            group: "default".into(),
            slots: 2,
            in_use: 0
        }),
        "{body}"
    );
    assert_eq!(s.totals().0, 0);

    let server = UpdateServer::start(Some(&coordinator.url)).await;
    let v = server
        .slots_until(&client, "the coordinator's slots", |r| {
            r["state"] == "known"
        })
        .await;
    assert_eq!(v["reboot_slots"]["coordinator"], coordinator.url.as_str());
    assert_eq!(v["reboot_slots"]["in_use"], 0);

    // Two hosts reboot: one in each group.
    for (id, group) in [("host-a", "default"), ("host-b", "db")] {
        let a = fleetlock(&client, &coordinator.url, "/v1/pre-reboot", id, group).await;
        assert_eq!(a.status, 200, "{id}: {:?}", a.error);
    }
    let (_, body) = status(&client, &coordinator.url).await;
    let s: CoordinatorStatus = serde_json::from_str(&body).unwrap();
    let mut groups = s.groups.clone();
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    assert_eq!(
        groups,
        vec![
            GroupSlots {
                group: "db".into(),
                slots: 1,
                in_use: 1
            },
            GroupSlots {
                group: "default".into(),
                slots: 2,
                in_use: 1
            },
        ]
    );
    let v = server
        .slots_until(&client, "two slots in use", |r| r["in_use"] == 2)
        .await;
    assert_eq!(
        (
            v["reboot_slots"]["in_use"].clone(),
            v["reboot_slots"]["total"].clone()
        ),
        (json!(2), json!(3))
    );
    // One host is back: one slot in use.
    let a = fleetlock(
        &client,
        &coordinator.url,
        "/v1/steady-state",
        "host-a",
        "default",
    )
    .await;
    assert_eq!(a.status, 200);
    server
        .slots_until(&client, "one slot in use", |r| r["in_use"] == 1)
        .await;

    // etcd down: the coordinator answers 503 and the page says the coordinator is unavailable.
    etcd.kill(0);
    let (st, body) = status(&client, &coordinator.url).await;
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("etcd_unavailable"), "{body}");
    // (The page's request may also time out first while the coordinator waits for etcd.)
    let v = server
        .slots_until(&client, "the etcd outage", |r| r["state"] == "unavailable")
        .await;
    let error = v["reboot_slots"]["error"].as_str().unwrap();
    assert!(error.contains(&coordinator.url), "{error}");

    // The coordinator stopped: unreachable, and the rest of the page is still there.
    assert!(coordinator.terminate());
    let v = server
        .slots_until(&client, "the coordinator to be unreachable", |r| {
            r["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("cannot reach"))
        })
        .await;
    assert_eq!(v["channel"], "stable");
    assert!(v["series"]["buckets"].as_array().is_some());
    server.shutdown.cancel();

    // Without --coordinator the page says none is configured.
    let plain = UpdateServer::start(None).await;
    assert_eq!(
        plain.view(&client).await["reboot_slots"],
        json!({"state": "not_configured"})
    );
    plain.shutdown.cancel();
}

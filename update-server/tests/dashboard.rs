//! Dashboard series API against known event histories: exact counts per bucket for every series,
//! on a real server with a real SQLite database.

mod common;

use common::postgres::Postgres;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use twinroot_format::omaha::{event_result, event_type};
use update_server::store::HistoryRow;

fn hist(at: i64, m: &str, version: &str, target: Option<&str>, status: &str) -> HistoryRow {
    HistoryRow {
        at,
        machine_id: m.to_string(),
        channel: "beta".to_string(),
        group: String::new(),
        version: Some(version.to_string()),
        target_version: target.map(str::to_string),
        status: status.to_string(),
        event_type: None,
        event_result: None,
        error_code: None,
    }
}

fn line(v: &Value, path: &[&str]) -> Vec<Value> {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_array()
        .unwrap_or_else(|| panic!("{path:?} is not an array in {v}"))
        .clone()
}

fn ints(v: &[Value]) -> Vec<i64> {
    v.iter().map(|x| x.as_i64().unwrap_or(0)).collect()
}

/// The last `n` entries.
fn tail<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    v[v.len() - n..].to_vec()
}

#[tokio::test]
async fn series_match_a_known_history_per_bucket() {
    let s = TestServer::start().await;
    check_known_history(&s).await;
    s.stop().await;
}

/// The same history through PostgreSQL (the dashboard's migration, catch-up and queries).
#[tokio::test]
async fn series_match_a_known_history_per_bucket_on_postgresql() {
    let pg = Postgres::start().await;
    let url = pg.url.clone();
    let s = TestServer::start_with(move |c| c.database_url = Some(url)).await;
    check_known_history(&s).await;
    s.stop().await;
}

async fn check_known_history(s: &TestServer) {
    s.release_on("2.0.0", "beta").await;
    s.put(
        "/api/v1/rollouts/beta",
        json!({"policy": {"start_percent": 0, "ramp": {"kind": "linear", "duration_secs": 36000},
               "halt": {"max_failure_percent": 20, "min_reports": 3}}}),
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let b3 = now - now.rem_euclid(3600);
    let (b0, b1, b2) = (b3 - 3 * 3600, b3 - 2 * 3600, b3 - 3600);
    // A fifth host checks in now, through the Omaha endpoint (0% eligible: no grant).
    assert!(is_noupdate(
        &s.omaha(&ue_request("h5", "1.0.0", "beta", vec![])).await
    ));
    // The ramp started at the start of bucket 0: 10% more per hour.
    sqlx::query("UPDATE rollouts SET started_at = $1 WHERE channel = 'beta' AND grp = ''")
        .bind(b0)
        .execute(&s.state.store.pool)
        .await
        .unwrap();
    let rows = vec![
        hist(b0 + 10, "h1", "1.0.0", Some("2.0.0"), "granted"),
        hist(b0 + 20, "h2", "1.0.0", Some("2.0.0"), "granted"),
        hist(b0 + 30, "h3", "1.0.0", Some("2.0.0"), "granted"),
        hist(b0 + 40, "h4", "1.0.0", Some("2.0.0"), "granted"),
        hist(b1 + 10, "h1", "1.0.0", Some("2.0.0"), "downloading"),
        hist(b1 + 20, "h2", "1.0.0", Some("2.0.0"), "downloading"),
        hist(b1 + 50, "h1", "2.0.0", Some("2.0.0"), "complete"),
        hist(b1 + 60, "h3", "1.0.0", Some("2.0.0"), "error"),
        hist(b2 + 10, "h2", "2.0.0", Some("2.0.0"), "complete"),
        hist(b2 + 20, "h4", "1.0.0", Some("2.0.0"), "rolled_back"),
    ];
    let store = &s.state.store;
    let mut tx = store.begin().await.unwrap();
    store.insert_history_many(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();

    let v = s.get("/api/v1/series/beta?range=day").await;
    let series = &v["series"];
    assert_eq!(series["step"], 3600);
    let buckets = ints(&line(series, &["buckets"]));
    assert_eq!(buckets.len(), 24);
    assert_eq!(tail(&buckets, 4), vec![b0, b1, b2, b3]);
    let last4 = |path: &[&str]| tail(&ints(&line(series, path)), 4);
    // Hosts per version at the end of each bucket.
    assert_eq!(last4(&["versions", "1.0.0"]), vec![4, 3, 2, 3]);
    assert_eq!(last4(&["versions", "2.0.0"]), vec![0, 1, 2, 2]);
    assert!(
        ints(&line(series, &["versions", "1.0.0"]))[..20]
            .iter()
            .all(|n| *n == 0)
    );
    // History entries per status in each bucket.
    assert_eq!(last4(&["statuses", "granted"]), vec![4, 0, 0, 0]);
    assert_eq!(last4(&["statuses", "downloading"]), vec![0, 2, 0, 0]);
    assert_eq!(last4(&["statuses", "complete"]), vec![0, 1, 1, 0]);
    assert_eq!(last4(&["statuses", "error"]), vec![0, 1, 0, 0]);
    assert_eq!(last4(&["statuses", "rolled_back"]), vec![0, 0, 1, 0]);
    // Outcomes for the release and the failure share against the threshold.
    assert_eq!(last4(&["failures"]), vec![0, 1, 1, 0]);
    assert_eq!(last4(&["successes"]), vec![0, 1, 1, 0]);
    assert_eq!(
        tail(&line(series, &["failure_percent"]), 4),
        vec![Value::Null, json!(50.0), json!(50.0), json!(50.0)]
    );
    assert_eq!(series["halt_threshold_percent"], 20.0);
    assert_eq!(series["halt_min_reports"], 3);
    // Target of the ramp (linear 0 -> 100% over 10 h from b0) beside the actual share updated.
    let target: Vec<f64> = line(series, &["target_percent"])
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    // At the server's now (the view's end), which is a little after the test's.
    let server_now = series["to"].as_i64().unwrap();
    let expect_now = (server_now - b0) as f64 * 100.0 / 36000.0;
    assert_eq!(tail(&target, 4)[..3], [10.0, 20.0, 30.0]);
    assert!((target[23] - expect_now).abs() < 1e-9, "{target:?}");
    assert_eq!(target[19], 0.0, "before the start");
    let actual: Vec<f64> = line(series, &["actual_percent"])
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(tail(&actual, 4), vec![0.0, 25.0, 50.0, 40.0]);
    // Current figures.
    assert_eq!(v["release"], "2.0.0");
    assert_eq!(v["total_hosts"], 5);
    assert_eq!(v["updated_hosts"], 2);
    assert_eq!(v["hosts"], json!({"1.0.0": 3, "2.0.0": 2}));
    assert_eq!(v["halt_threshold_percent"], 20.0);
    // Activity: the promotion and the policy change.
    let kinds: Vec<&str> = v["activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"rollout_set"), "{kinds:?}");
    assert!(kinds.len() >= 2, "{kinds:?}");

    // The same history at the other granularities: a week in hours, 30 days in days.
    let w = s.get("/api/v1/series/beta?range=week").await;
    assert_eq!(line(&w["series"], &["buckets"]).len(), 168);
    assert_eq!(
        tail(&ints(&line(&w["series"], &["statuses", "downloading"])), 4),
        vec![0, 2, 0, 0]
    );
    let m = s.get("/api/v1/series/beta?range=30d").await;
    assert_eq!(m["series"]["step"], 86400);
    let days = ints(&line(&m["series"], &["buckets"]));
    assert_eq!(days.len(), 30);
    assert_eq!(*days.last().unwrap(), now - now.rem_euclid(86400));
    let sum = |p: &[&str]| ints(&line(&m["series"], p)).iter().sum::<i64>();
    assert_eq!(sum(&["statuses", "granted"]), 4);
    assert_eq!(sum(&["statuses", "complete"]), 2);
    assert_eq!(sum(&["failures"]), 2);
    assert_eq!(
        *ints(&line(&m["series"], &["versions", "2.0.0"]))
            .last()
            .unwrap(),
        2
    );
    // Asking again folds nothing twice.
    let again = s.get("/api/v1/series/beta?range=day").await;
    assert_eq!(again["series"]["versions"], v["series"]["versions"]);
    assert_eq!(again["series"]["statuses"], v["series"]["statuses"]);

    // The fleet overview agrees.
    let o = s.get("/api/v1/dashboard/overview").await;
    let beta = o["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "beta")
        .unwrap()
        .clone();
    assert_eq!(beta["total_hosts"], 5);
    assert_eq!(beta["updated_hosts"], 2);
    assert_eq!(beta["failures"], 2);
    assert_eq!(beta["successes"], 2);
    assert_eq!(beta["failure_percent"], 50.0);

    // A host that failed its check and then reports its rollback is one failed host, as the
    // automatic halt counts it: h3's rollback is folded in a later catch-up than its error, h6's
    // error and rollback in the same one.
    let rows = vec![
        hist(now, "h3", "1.0.0", Some("2.0.0"), "rolled_back"),
        hist(now, "h6", "1.0.0", Some("2.0.0"), "error"),
        hist(now, "h6", "1.0.0", Some("2.0.0"), "rolled_back"),
    ];
    let mut tx = store.begin().await.unwrap();
    store.insert_history_many(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
    let m = s.get("/api/v1/series/beta?range=30d").await;
    let sum = |p: &[&str]| ints(&line(&m["series"], p)).iter().sum::<i64>();
    assert_eq!(sum(&["statuses", "rolled_back"]), 3);
    assert_eq!(sum(&["statuses", "error"]), 2);
    assert_eq!(sum(&["failures"]), 3);
    assert_eq!(sum(&["successes"]), 2);
}

#[tokio::test]
async fn live_omaha_traffic_shows_up_in_the_last_hour() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "stable").await;
    s.put(
        "/api/v1/rollouts/stable",
        json!({"policy": {"halt": {"max_failure_percent": 50, "min_reports": 2}}}),
    )
    .await;
    for m in ["a", "b", "c"] {
        assert!(granted(&s.omaha(&ue_request(m, "1.0.0", "stable", vec![])).await).is_some());
    }
    // a: downloads, installs, reboots into 2.0.0. b: install error. c: still on its way.
    for (t, r) in [
        (event_type::DOWNLOAD_STARTED, event_result::SUCCESS),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS),
    ] {
        s.omaha(&event_request("a", "1.0.0", "stable", vec![ev(t, r, None)]))
            .await;
    }
    s.omaha(&ue_request(
        "a",
        "2.0.0",
        "stable",
        vec![ev(
            event_type::UPDATE_COMPLETE,
            event_result::SUCCESS_REBOOT,
            None,
        )],
    ))
    .await;
    s.omaha(&event_request(
        "b",
        "1.0.0",
        "stable",
        vec![ev(3, 0, Some(7))],
    ))
    .await;

    let v = s.get("/api/v1/series/stable?range=hour").await;
    let series = &v["series"];
    assert_eq!(series["step"], 60);
    assert_eq!(line(series, &["buckets"]).len(), 60);
    let sum = |p: &[&str]| ints(&line(series, p)).iter().sum::<i64>();
    assert_eq!(sum(&["statuses", "granted"]), 3);
    assert_eq!(sum(&["statuses", "downloading"]), 1);
    assert_eq!(sum(&["statuses", "installed"]), 1);
    assert_eq!(sum(&["statuses", "complete"]), 1);
    assert_eq!(sum(&["statuses", "error"]), 1);
    assert_eq!(sum(&["failures"]), 1);
    assert_eq!(sum(&["successes"]), 1);
    let last = |p: &[&str]| *ints(&line(series, p)).last().unwrap();
    assert_eq!(last(&["versions", "1.0.0"]), 2);
    assert_eq!(last(&["versions", "2.0.0"]), 1);
    assert_eq!(v["total_hosts"], 3);
    assert_eq!(v["updated_hosts"], 1);
    // What the automatic halt counts: 1 failure of 2 reports, 50% (not above the threshold).
    assert_eq!(v["halt_failures"], 1);
    assert_eq!(v["halt_reports"], 2);
    assert_eq!(v["halt_failure_percent"], 50.0);
    assert_eq!(v["paused"], false);
    assert!((v["current_percent"].as_f64().unwrap() - 100.0).abs() < 1e-9);

    // An operator pause shows up in the activity feed with its reason.
    s.post(
        "/api/v1/rollouts/stable/pause",
        json!({"reason": "looking at b"}),
    )
    .await;
    let v = s.get("/api/v1/series/stable?range=hour").await;
    assert_eq!(v["paused"], true);
    assert_eq!(v["activity"][0]["kind"], "rollout_paused");
    assert!(
        v["activity"][0]["message"]
            .as_str()
            .unwrap()
            .contains("looking at b")
    );

    // Instance search and filters.
    let (st, found) = s
        .api(
            Method::GET,
            "/api/v1/dashboard/instances?status=error",
            Some(&s.viewer),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(found["total"], 1);
    assert_eq!(found["rows"][0]["machine_id"], "b");
    let found = s
        .get("/api/v1/dashboard/instances?q=c&channel=stable&version=1.0.0")
        .await;
    assert_eq!(found["total"], 1);
    assert_eq!(found["rows"][0]["status"], "granted");
    let none = s.get("/api/v1/dashboard/instances?q=%25").await;
    assert_eq!(none["total"], 0, "% is searched for literally");

    // Release page: promotion history and hosts on it.
    let r = s.get("/api/v1/dashboard/releases/2.0.0").await;
    assert_eq!(r["promotions"][0]["channel"], "stable");
    assert_eq!(r["promotions"][0]["forced"], true);
    assert_eq!(r["hosts_per_channel"]["stable"], 1);
    s.stop().await;
}

#[tokio::test]
async fn dashboard_reads_need_a_token_and_bad_ranges_are_refused() {
    let s = TestServer::start().await;
    let (st, _) = s
        .api(Method::GET, "/api/v1/series/stable", None, None)
        .await;
    assert_eq!(st, 401);
    let (st, _) = s
        .api(
            Method::GET,
            "/api/v1/dashboard/overview",
            Some("nope"),
            None,
        )
        .await;
    assert_eq!(st, 401);
    let (st, v) = s
        .api(
            Method::GET,
            "/api/v1/series/stable?range=year",
            Some(&s.viewer),
            None,
        )
        .await;
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("year"), "{v}");
    let (st, v) = s
        .api(Method::GET, "/api/v1/series/nosuch", Some(&s.viewer), None)
        .await;
    assert_eq!(st, 404);
    assert!(v["error"].as_str().unwrap().contains("nosuch"), "{v}");
    // The pages themselves are public (they hold no data).
    let page = s
        .http
        .get(format!("{}/dashboard/", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("app.js"));
    s.stop().await;
}

/// Reads server-sent events from a response: (event name, JSON data).
struct EventReader {
    body: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buf: String,
}

impl EventReader {
    fn new(resp: reqwest::Response) -> EventReader {
        EventReader {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next event, `None` when the stream ends; panics after 60 s without one.
    async fn next(&mut self) -> Option<(String, Value)> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim_start().to_string())
                };
                // Comments (keep-alives) carry no event.
                if let Some(name) = field("event:") {
                    let data = field("data:").unwrap_or_default();
                    return Some((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .expect("no server-sent event within 60 s")?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    }

    /// Skips events until a `change` whose marks satisfy `pred`.
    async fn change_where(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next().await {
                Some((name, data)) if name == "change" && pred(&data) => return data,
                Some(_) => {}
                None => panic!("the event stream ended before {what}"),
            }
        }
    }
}

#[tokio::test]
async fn event_stream_announces_checkins_and_pauses_and_ends_at_shutdown() {
    let s = TestServer::start().await;
    let (st, _) = s
        .api(Method::GET, "/api/v1/dashboard/events", None, None)
        .await;
    assert_eq!(st, 401);
    let resp = s
        .http
        .get(format!("{}/api/v1/dashboard/events", s.url))
        .bearer_auth(&s.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = EventReader::new(resp);
    let (name, _) = events.next().await.unwrap();
    assert_eq!(name, "hello");

    // A host's first check-in (no news in its history: only its check-in time moves).
    assert!(is_noupdate(
        &s.omaha(&ue_request("live-1", "1.0.0", "stable", vec![]))
            .await
    ));
    let after_checkin = events
        .change_where("the check-in", |m| m["seen"].as_i64() > Some(0))
        .await;
    // A pause writes activity and changes the rollout.
    s.post(
        "/api/v1/rollouts/stable/pause",
        json!({"reason": "live test"}),
    )
    .await;
    events
        .change_where("the pause", |m| {
            m["activity"].as_i64() > after_checkin["activity"].as_i64()
                && m["config"] != after_checkin["config"]
        })
        .await;

    // Shutting the server down ends the stream (a graceful shutdown does not wait for it).
    s.stop().await;
    loop {
        if events.next().await.is_none() {
            break;
        }
    }
}

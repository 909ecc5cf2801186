//! The rollout page in a real headless Debian chromium, driven over the DevTools protocol: log in
//! with a token, check the figures and charts of a fleet seeded with a known history, pause the
//! rollout from the page (with its confirmation) and see it paused through the API; see changes
//! made through the API appear on the open page (server-sent events); a screenshot is saved.

mod common;
mod dashboard_fleet;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use dashboard_fleet::{FleetSpec, forty_hosts_policy, seed};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless chromium with a fresh profile, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let bin = ["chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("chromium is not installed (Debian packages chromium; see scripts/deps)");
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--window-size=1280,1700",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Chromium writes the port it picked into the profile.
        let file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(s) = std::fs::read_to_string(&file)
                && let Some(p) = s.lines().next().and_then(|l| l.trim().parse().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Browser {
            child,
            _profile: profile,
            port,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page's DevTools connection.
struct Page {
    ws: Ws,
    next: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let http = update_server::http_client();
        let target: Value = http
            .put(format!(
                "http://127.0.0.1:{}/json/new?about:blank",
                browser.port
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Page { ws, next: 1 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools connection closed")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression (promises awaited) and returns its JSON value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Polls an expression until it is truthy.
    async fn wait(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText").await;
                panic!("timed out waiting for {what}; page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A real mouse click in the middle of the element.
    async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let rect = self
            .wait(
                &format!("{selector} to be visible"),
                &format!(
                    "(() => {{ const e = document.querySelector({sel}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return r.width > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()"
                ),
            )
            .await;
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    async fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector).await;
        self.call("Input.insertText", json!({"text": text})).await;
    }

    async fn text(&mut self, selector: &str) -> String {
        let sel = serde_json::to_string(selector).unwrap();
        self.wait(
            selector,
            &format!("document.querySelector({sel}) && document.querySelector({sel}).textContent"),
        )
        .await
        .as_str()
        .unwrap()
        .trim()
        .to_string()
    }

    /// Fills in the login form with `token` and waits for the rollout page as `role`.
    async fn log_in(&mut self, token: &str, role: &str) {
        self.wait("the login form", "document.getElementById('token')")
            .await;
        self.type_into("#token", token).await;
        self.click("#login button").await;
        self.wait(
            &format!("the rollout page as {role}"),
            &format!(
                "document.getElementById('fig-updated') && document.getElementById('who').textContent === '{role}'"
            ),
        )
        .await;
    }

    async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-rollout.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_page_shows_the_seeded_fleet_and_pauses_from_the_browser() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "beta").await;
    s.put("/api/v1/rollouts/beta", forty_hosts_policy()).await;
    let spec = FleetSpec::forty_hosts(chrono::Utc::now().timestamp());
    let fig = seed(&s.state.store, &spec).await;
    assert_eq!((fig.granted, fig.updated, fig.failed), (24, 21, 3));

    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    page.call("Page.enable", json!({})).await;
    page.call(
        "Page.navigate",
        json!({"url": format!("{}/dashboard/#/channel/beta", s.url)}),
    )
    .await;
    // Not logged in: the login form; an admin token logs in.
    page.log_in(&s.admin, "admin").await;

    assert_eq!(page.text("#fig-updated").await, "21 / 40");
    assert_eq!(page.text("#fig-actual").await, "52.5%");
    // Linear 10% -> 100% over 24 h, 20 h in: 85%.
    assert_eq!(page.text("#fig-target").await, "85.0%");
    // 3 failures of 24 reports, against a 25% threshold.
    assert_eq!(page.text("#fig-failure").await, "12.5%");
    assert_eq!(page.text("#fig-threshold").await, "25.0%");
    assert_eq!(page.text("#state").await, "rolling");
    // This server has no reboot coordinator (`serve --coordinator`): the page says so.
    assert_eq!(page.text("#fig-slots").await, "–");
    assert!(
        page.text("#slots-note")
            .await
            .contains("no coordinator configured")
    );
    // The charts: two versions stacked; the failed reports add up to 3, the healthy ones to 21.
    let polys = page
        .eval(
            "[...document.querySelectorAll('#chart-versions polygon')].map(p => p.dataset.series)",
        )
        .await;
    assert_eq!(polys, json!(["1.0.0", "2.0.0"]));
    let sum = |series: &str| {
        format!(
            "[...document.querySelectorAll('#chart-statuses rect[data-series=\"{series}\"]')].reduce((a, r) => a + Number(r.dataset.value), 0)"
        )
    };
    assert_eq!(page.eval(&sum("failed")).await, json!(3));
    assert_eq!(page.eval(&sum("healthy")).await, json!(21));
    assert_eq!(page.eval(&sum("granted (checking)")).await, json!(24));
    let ramp = page
        .eval("document.querySelectorAll('#chart-ramp path').length")
        .await;
    assert_eq!(ramp, json!(2));
    page.screenshot(&screenshot_path()).await;

    // The other pages: overview, instance list with a filter, a host, the release.
    page.eval("location.hash = '#/'; true").await;
    let card = page
        .wait(
            "the fleet overview",
            "document.querySelector('.channel[data-channel=beta]') && document.querySelector('.channel[data-channel=beta]').innerText",
        )
        .await;
    assert!(card.as_str().unwrap().contains("21 / 40"), "{card}");
    page.eval("location.hash = '#/instances?status=error'; true")
        .await;
    page.wait(
        "the filtered instance list",
        "document.getElementById('instances-total') && document.getElementById('instances-total').textContent === '3'",
    )
    .await;
    page.click("table a[href^='#/host/']").await;
    let host = page
        .wait(
            "the host page",
            "location.hash.startsWith('#/host/') && document.querySelector('main h1') && document.body.innerText.includes('Event history') && document.body.innerText",
        )
        .await;
    assert!(host.as_str().unwrap().contains("failed"), "{host}");
    page.eval("location.hash = '#/release/2.0.0'; true").await;
    let rel = page
        .wait(
            "the release page",
            "document.getElementById('promote') && document.body.innerText",
        )
        .await;
    assert!(rel.as_str().unwrap().contains("Promotion history"), "{rel}");
    assert!(rel.as_str().unwrap().contains("forced"), "{rel}");
    page.eval("location.hash = '#/channel/beta'; true").await;
    page.wait("the rollout page again", "document.getElementById('pause')")
        .await;

    // Pause from the page: the confirmation dialog, a reason, confirm.
    page.click("#pause").await;
    page.wait(
        "the confirmation dialog",
        "document.getElementById('confirm').open",
    )
    .await;
    page.type_into("#confirm-reason", "too many disk errors")
        .await;
    page.click("#confirm-ok").await;
    let shown = wait_for(60, "the rollout to be paused", || async {
        let v = s.get("/api/v1/rollouts/beta").await;
        (v["paused"] == true).then_some(v)
    })
    .await;
    assert_eq!(shown["pause_reason"], "too many disk errors");
    assert_eq!(shown["auto_halted"], false);
    // The page shows it without a reload, with a resume button and the activity entry.
    page.wait(
        "the paused state on the page",
        "document.getElementById('state') && document.getElementById('state').textContent === 'paused' && document.getElementById('resume')",
    )
    .await;
    assert!(
        page.text("#activity")
            .await
            .contains("too many disk errors"),
        "activity feed"
    );

    // Changes made elsewhere reach the open page through its event stream, without a reload: a
    // resume through the API and a new host's check-in.
    page.wait(
        "the event stream to be connected",
        "document.body.dataset.live === 'sse'",
    )
    .await;
    page.eval("window.sameDocument = true").await;
    s.post("/api/v1/rollouts/beta/resume", json!({})).await;
    // (At 85% of the ramp it may be granted the release; it is on 1.0.0 either way.)
    s.omaha(&ue_request("live-host", "1.0.0", "beta", vec![]))
        .await;
    page.wait(
        "the resume and the new host on the page",
        "document.getElementById('state') && document.getElementById('state').textContent === 'rolling' && document.getElementById('fig-updated').textContent === '21 / 41'",
    )
    .await;
    assert_eq!(
        page.eval("[window.sameDocument === true, document.body.dataset.live, Number(document.body.dataset.liveEvents) > 0]")
            .await,
        json!([true, "sse", true])
    );

    // A viewer sees the same page without write buttons.
    page.eval("sessionStorage.clear(); location.reload(); true")
        .await;
    page.log_in(&s.viewer, "viewer").await;
    assert_eq!(
        page.eval("!!document.getElementById('pause') || !!document.getElementById('resume')")
            .await,
        json!(false)
    );
    println!("screenshot: {}", screenshot_path().display());
    drop(page);
    drop(browser);
    s.stop().await;
}

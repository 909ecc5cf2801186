//! The server as a process: restart keeps state, kill -9 loses no acknowledged event, and the
//! PostgreSQL path with several server processes on one database.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::postgres::Postgres;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

async fn admin_get(http: &reqwest::Client, url: &str, token: &str, path: &str) -> Value {
    let (st, v) = api_call(http, url, Method::GET, path, Some(token), None).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

async fn admin_send(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Value,
) -> Value {
    let (st, v) = api_call(http, url, method, path, Some(token), Some(body)).await;
    assert!(st < 300, "{path}: {st} {v}");
    v
}

async fn snapshot(http: &reqwest::Client, url: &str, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for p in [
        "/api/v1/releases",
        "/api/v1/channels",
        "/api/v1/instances",
        "/api/v1/activity",
        "/api/v1/instances/r1/history",
    ] {
        out.push(admin_get(http, url, token, p).await);
    }
    let mut rollouts = admin_get(http, url, token, "/api/v1/rollouts").await;
    // current_percent moves with the clock; everything else must be identical.
    for r in rollouts.as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("current_percent");
    }
    out.push(rollouts);
    out
}

#[tokio::test]
async fn restart_keeps_all_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let signer = signer(dir.path(), "k");
    let token = create_token(&data, None, "admin");
    let http = update_server::http_client();
    let mut p = ServerProcess::spawn(&data, None, Some(&signer.keyring_path));
    p.wait_ready().await;
    let (st, v) = upload(&http, &p.url, bundle(&signer, "2.0.0"), &token).await;
    assert_eq!(st, 201, "{v}");
    admin_send(
        &http,
        &p.url,
        &token,
        Method::POST,
        "/api/v1/releases/2.0.0/promote",
        json!({"channel": "alpha"}),
    )
    .await;
    admin_send(
        &http,
        &p.url,
        &token,
        Method::PUT,
        "/api/v1/rollouts/alpha",
        json!({"policy": {"start_percent": 100, "max_in_flight": 5}}),
    )
    .await;
    admin_send(
        &http,
        &p.url,
        &token,
        Method::POST,
        "/api/v1/rollouts/beta/pause",
        json!({"reason": "freeze"}),
    )
    .await;
    let r = omaha_post(&http, &p.url, &ue_request("r1", "1.0.0", "alpha", vec![])).await;
    assert!(granted(&r).is_some());
    omaha_post(
        &http,
        &p.url,
        &event_request("r1", "1.0.0", "alpha", vec![ev(13, 1, None)]),
    )
    .await;
    let before = snapshot(&http, &p.url, &token).await;

    // A second server on the same SQLite database refuses to start, and the first one keeps
    // serving, unchanged.
    let (code, err) = serve_until_exit(&data).await;
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("in use by another update-server") && err.contains("server.db"),
        "{err}"
    );
    assert_eq!(snapshot(&http, &p.url, &token).await, before);
    p.terminate();

    let mut p = ServerProcess::spawn(&data, None, Some(&signer.keyring_path));
    p.wait_ready().await;
    let after = snapshot(&http, &p.url, &token).await;
    assert_eq!(before, after);
    // The grant is still in flight after the restart: the host is answered again, and the
    // payload is still served.
    let offer =
        granted(&omaha_post(&http, &p.url, &ue_request("r1", "1.0.0", "alpha", vec![])).await)
            .unwrap();
    let resp = http.get(offer.payload_url().unwrap()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    p.terminate();
}

#[tokio::test]
async fn kill_9_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = create_token(&data, None, "admin");
    let http = update_server::http_client();
    let mut p = ServerProcess::spawn(&data, None, None);
    p.wait_ready().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..6 {
        let http = http.clone();
        let url = p.url.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0usize;
            // Bounded: stops at the kill (errors) or after 5,000 requests.
            for _ in 0..5000 {
                let req = event_request(&format!("k{t}"), "1.0.0", "stable", vec![ev(13, 1, None)]);
                let sent = http
                    .post(format!("{url}/v1/update/"))
                    .body(req.to_xml())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => {
                            mine += 1;
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => break,
                    },
                    _ => break,
                }
            }
            mine
        }));
    }
    let counter = acked.clone();
    wait_for(120, "300 acknowledged events", || {
        let n = counter.load(Ordering::SeqCst);
        async move { (n >= 300).then_some(()) }
    })
    .await;
    p.kill9();
    let mut per_task = Vec::new();
    for t in tasks {
        per_task.push(t.await.unwrap());
    }
    let mut p = ServerProcess::spawn(&data, None, None);
    p.wait_ready().await;
    for (t, mine) in per_task.iter().enumerate() {
        let hist = admin_get(
            &http,
            &p.url,
            &token,
            &format!("/api/v1/instances/k{t}/history"),
        )
        .await;
        let stored = hist.as_array().unwrap().len();
        assert!(
            stored >= *mine,
            "k{t}: {mine} acknowledged, {stored} stored"
        );
    }
    p.terminate();
}

#[tokio::test]
async fn postgres_several_servers_agree() {
    let pg = Postgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let signer = signer(dir.path(), "k");
    let token = create_token(&data, Some(&pg.url), "admin");
    let http = update_server::http_client();
    let mut a = ServerProcess::spawn(&data, Some(&pg.url), Some(&signer.keyring_path));
    let mut b = ServerProcess::spawn(&data, Some(&pg.url), Some(&signer.keyring_path));
    a.wait_ready().await;
    b.wait_ready().await;
    let (st, v) = upload(&http, &a.url, bundle(&signer, "2.0.0"), &token).await;
    assert_eq!(st, 201, "{v}");
    admin_send(
        &http,
        &b.url,
        &token,
        Method::POST,
        "/api/v1/releases/2.0.0/promote",
        json!({"channel": "stable", "force": true}),
    )
    .await;
    admin_send(
        &http,
        &a.url,
        &token,
        Method::PUT,
        "/api/v1/rollouts/stable",
        json!({"policy": {"max_in_flight": 3}}),
    )
    .await;

    // 16 hosts at once, spread over both servers: the in-flight limit holds fleet-wide.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let http = http.clone();
        let url = if i % 2 == 0 {
            a.url.clone()
        } else {
            b.url.clone()
        };
        tasks.push(tokio::spawn(async move {
            let r = omaha_post(
                &http,
                &url,
                &ue_request(&format!("pg{i}"), "1.0.0", "stable", vec![]),
            )
            .await;
            granted(&r).map(|o| (format!("pg{i}"), o.check().is_ok()))
        }));
    }
    let mut grants = Vec::new();
    for t in tasks {
        if let Some((host, valid)) = t.await.unwrap() {
            assert!(valid);
            grants.push(host);
        }
    }
    assert_eq!(grants.len(), 3, "{grants:?}");
    let failed = grants[0].clone();

    // Events through one server are seen through the other.
    omaha_post(
        &http,
        &a.url,
        &event_request(&failed, "1.0.0", "stable", vec![ev(3, 0, Some(44))]),
    )
    .await;
    let sa = snapshot(&http, &a.url, &token).await;
    let sb = snapshot(&http, &b.url, &token).await;
    assert_eq!(sa, sb);
    let hist = admin_get(
        &http,
        &b.url,
        &token,
        &format!("/api/v1/instances/{failed}/history"),
    )
    .await;
    assert_eq!(
        hist.as_array().unwrap().last().unwrap()["status"],
        "rolled_back"
    );
    let inst = admin_get(&http, &b.url, &token, "/api/v1/instances?channel=stable").await;
    assert_eq!(inst.as_array().unwrap().len(), 16);
    // The failed host's slot is free again: one more host gets in, through either server.
    let r = omaha_post(
        &http,
        &b.url,
        &ue_request("pg-late", "1.0.0", "stable", vec![]),
    )
    .await;
    assert!(
        granted(&r).is_some(),
        "{:#}",
        admin_get(&http, &b.url, &token, "/api/v1/instances").await
    );
    // A quarantine lift recorded through one server reaches the host through the other.
    admin_send(
        &http,
        &a.url,
        &token,
        Method::POST,
        &format!("/api/v1/instances/{failed}/lift-quarantine"),
        json!({"version": "2.0.0"}),
    )
    .await;
    let r = omaha_post(
        &http,
        &b.url,
        &ue_request(&failed, "1.0.0", "stable", vec![]),
    )
    .await;
    assert_eq!(r.apps[0].lift_quarantine, ["2.0.0"]);
    // A channel created through one server is in the promotion order of the other.
    admin_send(
        &http,
        &b.url,
        &token,
        Method::POST,
        "/api/v1/channels",
        json!({"name": "canary", "after": "alpha"}),
    )
    .await;
    let channels = admin_get(&http, &a.url, &token, "/api/v1/channels").await;
    assert_eq!(channels[1]["name"], "canary", "{channels}");
    a.terminate();
    b.terminate();
}

/// Runs `update-server ARGS` against a server; returns (success, stdout, stderr).
fn run_cli(url: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_update-server"))
        .args(args)
        .env("TWINROOT_SERVER", url)
        .env("TWINROOT_TOKEN", token)
        .env_remove("TWINROOT_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `update-server serve` on `data` and waits (at most 30 s) for it to exit: its exit code
/// and stderr. A server that keeps running is killed and the test fails.
async fn serve_until_exit(data: &std::path::Path) -> (Option<i32>, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_update-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("TWINROOT_DATABASE_URL")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("a second update-server on {} kept running", data.display()))
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// stdout of a client subcommand that must succeed.
fn cli(url: &str, token: &str, args: &[&str]) -> String {
    let (ok, out, err) = run_cli(url, token, args);
    assert!(ok, "update-server {args:?}: {err}");
    out
}

/// stderr of a client subcommand that must fail.
fn cli_fails(url: &str, token: &str, args: &[&str]) -> String {
    let (ok, _, err) = run_cli(url, token, args);
    assert!(!ok, "update-server {args:?} should fail");
    err
}

/// One step of a CLI session: who runs it, the arguments, and for a step that must fail, the
/// pieces its error must contain.
struct Step(Who, &'static [&'static str], &'static [&'static str]);

enum Who {
    Admin,
    Viewer,
}

#[tokio::test]
async fn cli_subcommands_drive_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let signer = signer(dir.path(), "k");
    let token = create_token(&data, None, "admin");
    let viewer = create_token(&data, None, "viewer");
    let mut p = ServerProcess::spawn(&data, None, Some(&signer.keyring_path));
    p.wait_ready().await;
    let file = dir.path().join("5.0.0.bundle");
    std::fs::write(&file, bundle(&signer, "5.0.0")).unwrap();
    let url = p.url.clone();
    let file_s = file.to_str().unwrap().to_string();
    use Who::*;
    let script = [
        Step(Admin, &["release", "list"], &[]),
        Step(
            Admin,
            &["release", "promote", "5.0.0", "--channel", "alpha"],
            &[],
        ),
        Step(Admin, &["release", "list"], &[]),
        Step(
            Admin,
            &["release", "promote", "5.0.0", "--channel", "stable"],
            &["409", "beta"],
        ),
        Step(
            Admin,
            &[
                "release",
                "promote",
                "5.0.0",
                "--channel",
                "stable",
                "--force",
            ],
            &[],
        ),
        Step(
            Admin,
            &[
                "rollout",
                "set",
                "stable",
                "--start-percent",
                "25",
                "--steps",
                "3600:50,7200:100",
                "--max-in-flight",
                "10",
                "--window",
                "mon,tue@02:00+120@Europe/Berlin",
                "--halt-failure-percent",
                "10",
                "--halt-min-reports",
                "5",
            ],
            &[],
        ),
        Step(
            Admin,
            &["rollout", "pause", "stable", "--reason", "cli test"],
            &[],
        ),
        Step(Admin, &["rollout", "show", "stable"], &[]),
        Step(Admin, &["rollout", "resume", "stable"], &[]),
        // Group names reach the server as typed, spaces and slashes included.
        Step(
            Admin,
            &[
                "rollout",
                "set",
                "stable",
                "--group",
                "rack 7/a&b",
                "--start-percent",
                "50",
                "--ramp-secs",
                "86400",
            ],
            &[],
        ),
        Step(
            Viewer,
            &["rollout", "show", "stable", "--group", "rack 7/a&b"],
            &[],
        ),
        Step(Viewer, &["rollout", "pause", "stable"], &["403"]),
        Step(
            Admin,
            &["rollout", "set", "stable", "--window", "someday"],
            &["someday"],
        ),
        Step(
            Admin,
            &["channel", "create", "edge", "--after", "stable"],
            &[],
        ),
        Step(Viewer, &["channel", "list"], &[]),
        Step(
            Admin,
            &["channel", "create", "Edge!", "--after", "stable"],
            &["422", "\"Edge!\""],
        ),
        Step(Viewer, &["activity"], &[]),
        Step(Admin, &["rollout", "set", "--help"], &[]),
    ];
    let (url2, token2, viewer2) = (url.clone(), token.clone(), viewer.clone());
    let out = tokio::task::spawn_blocking(move || {
        let mut out = cli(&url2, &token2, &["release", "upload", &file_s]);
        for Step(who, args, fails_with) in script {
            let t = match who {
                Admin => &token2,
                Viewer => &viewer2,
            };
            if fails_with.is_empty() {
                out += &cli(&url2, t, args);
            } else {
                let err = cli_fails(&url2, t, args);
                assert!(
                    fails_with.iter().all(|f| err.contains(f)),
                    "{args:?}: {err}"
                );
            }
        }
        out
    })
    .await
    .unwrap();
    assert!(out.contains("release 5.0.0 stored"), "{out}");
    assert!(out.contains("5.0.0    -"), "{out}");
    assert!(out.contains("5.0.0    alpha"), "{out}");
    assert!(out.contains("PAUSED (cli test)"), "{out}");
    // Help names the token's variable but never shows its value (nor any other output).
    assert!(out.contains("[env: TWINROOT_TOKEN]"), "{out}");
    assert!(!out.contains(&token) && !out.contains(&viewer), "{out}");
    let help = Command::new(env!("CARGO_BIN_EXE_update-server"))
        .args(["serve", "--help"])
        .env(
            "TWINROOT_DATABASE_URL",
            "postgres://fleet:hunter2@db/twinroot",
        )
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("[env: TWINROOT_DATABASE_URL]"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
    // `rollout show` reads like the flags that set the policy.
    assert_contains(
        &out,
        &[
            "  start:      25%",
            "  ramp:       50% after 1h, 100% after 2h",
            "  in flight:  at most 10 (a grant stops counting after 2h)",
            "  windows:    mon,tue 02:00 for 2h (Europe/Berlin)",
            "  halt:       above 10% failures, once 5 hosts reported",
            "rollout stable group rack 7/a&b: release 5.0.0",
            "  ramp:       linear from 50% to 100% over 1d",
        ],
    );
    assert!(out.contains("release_promoted"), "{out}");
    assert!(out.contains("channel edge created after stable"), "{out}");
    assert!(out.contains("\nedge "), "{out}");
    omaha_post(
        &update_server::http_client(),
        &url,
        &ue_request("cli-host", "1.0.0", "stable", vec![]),
    )
    .await;
    omaha_post(
        &update_server::http_client(),
        &url,
        &ue_request("rack 7/host", "1.0.0", "stable", vec![]),
    )
    .await;
    omaha_post(
        &update_server::http_client(),
        &url,
        &ue_request("émile", "1.0.0", "stable", vec![]),
    )
    .await;
    let (url3, token3) = (url.clone(), token.clone());
    let (
        by_channel,
        json_list,
        lifted,
        unknown_host,
        first_page,
        after_first,
        bad_status,
        lifted_rack,
        last_page,
    ) = tokio::task::spawn_blocking(move || {
        (
            cli(&url3, &token3, &["instances", "--channel", "stable"]),
            cli(&url3, &token3, &["instances", "--json"]),
            cli(
                &url3,
                &token3,
                &["instances", "lift-quarantine", "cli-host", "5.0.0"],
            ),
            cli_fails(
                &url3,
                &token3,
                &["instances", "lift-quarantine", "nobody", "5.0.0"],
            ),
            run_cli(&url3, &token3, &["instances", "--limit", "1"]),
            cli(&url3, &token3, &["instances", "--after", "cli-host"]),
            cli_fails(&url3, &token3, &["instances", "--status", "bogus"]),
            cli(
                &url3,
                &token3,
                &["instances", "lift-quarantine", "rack 7/host", "5.0.0"],
            ),
            run_cli(
                &url3,
                &token3,
                &["instances", "--after", "rack 7/host", "--limit", "1"],
            ),
        )
    })
    .await
    .unwrap();
    assert_contains(&by_channel, &["cli-host", "LAST_SEEN"]);
    let v: Value = serde_json::from_str(&json_list).unwrap();
    assert_eq!(v[0]["machine_id"], "cli-host");
    // Pages: a full page says where the next one starts; names with '/' and ' ' go as typed.
    let (ok, first, hint) = &first_page;
    assert!(*ok, "{hint}");
    assert!(
        first.contains("cli-host") && !first.contains("rack 7/host"),
        "{first}"
    );
    assert_contains(
        hint,
        &["more hosts follow: run again with --after 'cli-host'"],
    );
    let (ok, last, hint) = &last_page;
    assert!(*ok && last.contains("émile"), "{last}{hint}");
    assert_contains(hint, &["--after 'émile'"]);
    assert!(
        after_first.contains("rack 7/host") && !after_first.contains("cli-host"),
        "{after_first}"
    );
    assert_contains(&bad_status, &["422", "\"bogus\" is not a host status"]);
    assert_contains(&lifted_rack, &["lifted for host rack 7/host"]);
    assert_contains(&lifted, &["quarantine of 5.0.0 lifted for host cli-host"]);
    assert_contains(&unknown_host, &["404", "host nobody"]);
    p.terminate();
}

#[test]
fn serve_refuses_bad_time_scales_and_coordinator_urls() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    for (flag, value, says) in [
        ("--time-scale", "0", "greater than 0"),
        ("--time-scale", "-2", "greater than 0"),
        ("--time-scale", "NaN", "finite"),
        ("--time-scale", "inf", "finite"),
        ("--time-scale", "fast", "not a number"),
        ("--coordinator", "ftp://coord", "http:// or https://"),
        ("--coordinator", "not a url", "invalid"),
        ("--seen-delay-ms", "5000", "0..=4000"),
        ("--seen-delay-ms", "1s", "invalid digit"),
        ("--cached-hosts", "1.5", "invalid digit"),
        ("--cached-hosts", "lots", "invalid digit"),
    ] {
        let err = cli_fails(
            "http://127.0.0.1:1",
            "",
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data,
                flag,
                value,
            ],
        );
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
}

/// `update-server ARGS` that needs no server.
fn local(args: &[&str]) -> (bool, String, String) {
    run_cli("http://127.0.0.1:1", "", args)
}

#[tokio::test]
async fn check_ins_written_behind_reach_the_database() {
    check_ins_written_behind_reach(None).await;
}

#[tokio::test]
async fn check_ins_written_behind_reach_postgres() {
    let pg = Postgres::start().await;
    check_ins_written_behind_reach(Some(&pg.url)).await;
}

/// The host `id` as the admin API shows it: (checkins, last_seen, version).
async fn host_row(http: &reqwest::Client, url: &str, token: &str, id: &str) -> (i64, i64, String) {
    let hosts = admin_get(http, url, token, "/api/v1/instances").await;
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["machine_id"] == id)
        .unwrap_or_else(|| panic!("{id} missing: {hosts}"));
    (
        h["checkins"].as_i64().unwrap(),
        h["last_seen"].as_i64().unwrap(),
        h["version"].as_str().unwrap_or_default().to_string(),
    )
}

/// Check-ins that only say "still here" are answered before they are written (`serve
/// --seen-delay-ms`, 1 s by default): they reach the database within the delay when check-ins
/// stop, folded into the record when the host's next check-in changes it, and all of them on a
/// graceful stop.
async fn check_ins_written_behind_reach(database: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = create_token(&data, database, "admin");
    let http = update_server::http_client();
    let mut p = ServerProcess::spawn(&data, database, None);
    p.wait_ready().await;
    let check_in = |version: &'static str| {
        let (http, url) = (http.clone(), p.url.clone());
        async move {
            let r = omaha_post(&http, &url, &ue_request("w1", version, "stable", vec![])).await;
            assert!(is_noupdate(&r), "{r:?}");
        }
    };
    // New host (written at once), then three check-ins that change nothing else.
    for _ in 0..4 {
        check_in("1.0.0").await;
    }
    let (_, first_seen, _) = host_row(&http, &p.url, &token, "w1").await;
    wait_for(30, "four check-ins of w1 in the database", || async {
        (host_row(&http, &p.url, &token, "w1").await.0 == 4).then_some(())
    })
    .await;
    // Two more, then one that changes the record (a new version): it carries the two.
    check_in("1.0.0").await;
    check_in("1.0.0").await;
    check_in("1.0.1").await;
    let (n, seen, version) = host_row(&http, &p.url, &token, "w1").await;
    assert_eq!((n, version.as_str()), (7, "1.0.1"));
    assert!(seen >= first_seen);
    // Three more and a graceful stop right away: the stop writes them.
    for _ in 0..3 {
        check_in("1.0.1").await;
    }
    p.terminate();
    let mut p = ServerProcess::spawn(&data, database, None);
    p.wait_ready().await;
    let (n, last_seen, _) = host_row(&http, &p.url, &token, "w1").await;
    assert_eq!(n, 10, "check-ins lost on a graceful stop");
    assert!(last_seen >= seen);
    p.terminate();
}

/// Two servers on one PostgreSQL database count every check-in of hosts they both serve: one
/// writes check-ins behind (when it falls idle) while the other rewrites the same hosts' whole
/// records (a new version at every check-in), and neither overwrites the other's count.
#[tokio::test]
async fn two_servers_on_postgres_count_every_check_in() {
    let pg = Postgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = create_token(&data, Some(&pg.url), "admin");
    let http = update_server::http_client();
    let mut a = ServerProcess::spawn(&data, Some(&pg.url), None);
    let mut b = ServerProcess::spawn(&data, Some(&pg.url), None);
    a.wait_ready().await;
    b.wait_ready().await;
    let hosts: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    for _ in 0..3 {
        // Through a: check-ins that change nothing, written behind a second later.
        for id in &hosts {
            for _ in 0..2 {
                omaha_post(&http, &a.url, &ue_request(id, "1.0.0", "stable", vec![])).await;
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        // Through b, meanwhile: whole-record rewrites of the same hosts, until a has written.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(1600);
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (http, url, hosts, sent) =
                (http.clone(), b.url.clone(), hosts.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = t;
                while std::time::Instant::now() < until {
                    let version = format!("1.0.{}", n % 7 + 1);
                    let req = ue_request(&hosts[n % hosts.len()], &version, "stable", vec![]);
                    omaha_post(&http, &url, &req).await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    n += 8;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    // Graceful stops write what is still pending.
    a.terminate();
    b.terminate();
    let mut c = ServerProcess::spawn(&data, Some(&pg.url), None);
    c.wait_ready().await;
    let all = admin_get(&http, &c.url, &token, "/api/v1/instances").await;
    let counted: i64 = all
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["checkins"].as_i64().unwrap())
        .sum();
    assert_eq!(counted, sent.load(std::sync::atomic::Ordering::SeqCst));
    c.terminate();
}

#[tokio::test]
async fn revoked_tokens_are_refused() {
    revoked_tokens_are_refused_on(None).await;
}

#[tokio::test]
async fn revoked_tokens_are_refused_on_postgres() {
    let pg = Postgres::start().await;
    revoked_tokens_are_refused_on(Some(&pg.url)).await;
}

async fn revoked_tokens_are_refused_on(database: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap().to_string();
    let admin = create_token(&data, database, "admin");
    let viewer = create_token(&data, database, "viewer");
    // `token list|revoke` run offline against the same database as the server.
    let local = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", d.as_str()]);
        if let Some(url) = database {
            all.extend(["--database", url]);
        }
        local(&all)
    };
    let mut p = ServerProcess::spawn(&data, database, None);
    p.wait_ready().await;
    let http = update_server::http_client();
    let (status, _) = api_call(
        &http,
        &p.url,
        reqwest::Method::GET,
        "/api/v1/channels",
        Some(&viewer),
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (ok, listed, err) = local(&["token", "list", "--json"]);
    assert!(ok, "{err}");
    let tokens: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 2);
    assert!(
        !listed.contains(&viewer) && !listed.contains("hash"),
        "{listed}"
    );
    let viewer_id = tokens[1]["id"].as_i64().unwrap().to_string();
    assert_eq!(tokens[1]["role"], "viewer");
    assert!(tokens[1]["revoked_at"].is_null());

    let (ok, out, err) = local(&["token", "revoke", &viewer_id]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    // The running server refuses it from now on; the admin token still works.
    let (status, v) = api_call(
        &http,
        &p.url,
        reqwest::Method::GET,
        "/api/v1/channels",
        Some(&viewer),
        None,
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("revoked"), "{v}");
    let (status, _) = api_call(
        &http,
        &p.url,
        reqwest::Method::GET,
        "/api/v1/channels",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200);

    let (ok, table, _) = local(&["token", "list"]);
    assert!(ok);
    let viewer_line = table.lines().find(|l| l.contains("viewer")).unwrap();
    assert!(!viewer_line.trim_end().ends_with('-'), "{table}");
    // Revoking again says so; an unknown id is an error naming it.
    let (ok, out, _) = local(&["token", "revoke", &viewer_id]);
    assert!(ok && out.contains("already revoked"), "{out}");
    let (ok, _, err) = local(&["token", "revoke", "999"]);
    assert!(!ok && err.contains("token 999 does not exist"), "{err}");
    p.terminate();
}

/// `update-server backup ARGS` through the binary: (success, stdout, stderr).
fn backup(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_update-server"))
        .arg("backup")
        .args(args)
        .env_remove("TWINROOT_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn backup_while_serving_restores_every_host_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let signer = signer(dir.path(), "k");
    let token = create_token(&data, None, "admin");
    let mut p = ServerProcess::spawn(&data, None, Some(&signer.keyring_path));
    p.wait_ready().await;
    let http = update_server::http_client();
    let (status, v) = upload(&http, &p.url, bundle(&signer, "2.0.0"), &token).await;
    assert_eq!(status, 201, "{v}");
    // New hosts are committed before their answers.
    for i in 0..30 {
        omaha_post(
            &http,
            &p.url,
            &ue_request(&format!("b{i:02}"), "1.0.0", "stable", vec![]),
        )
        .await;
    }
    let data_s = data.to_str().unwrap().to_string();
    let target = dir.path().join("backup.db");
    let target_s = target.to_str().unwrap().to_string();
    let (d, t) = (data_s.clone(), target_s.clone());
    let runs = tokio::task::spawn_blocking(move || {
        (
            backup(&["--data-dir", &d, "--to", &t]),
            backup(&["--data-dir", &d, "--to", &t]),
            backup(&[
                "--data-dir",
                &d,
                "--database",
                "postgres://fleet:hunter2@db/twinroot",
                "--to",
                &format!("{t}.pg"),
            ]),
        )
    })
    .await
    .unwrap();
    let (ok, out, err) = &runs.0;
    assert!(*ok, "{err}");
    assert!(
        out.contains("backed up 30 hosts and 1 releases to"),
        "{out}"
    );
    let (ok, _, err) = &runs.1;
    assert!(!*ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = &runs.2;
    assert!(
        !*ok && err.contains("pg_dump") && !err.contains("hunter2"),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial") || n.ends_with(".pg"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    p.terminate();

    // With the server stopped too.
    let after_stop = dir.path().join("after-stop.db");
    let (d, t) = (data_s.clone(), after_stop.to_str().unwrap().to_string());
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || backup(&["--data-dir", &d, "--to", &t]))
            .await
            .unwrap();
    assert!(ok && out.contains("backed up 30 hosts"), "{out}{err}");

    // Restore: a data dir whose database is the backup serves the same hosts, releases and
    // tokens.
    let restored = dir.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&target, restored.join("server.db")).unwrap();
    let mut r = ServerProcess::spawn(&restored, None, Some(&signer.keyring_path));
    r.wait_ready().await;
    let hosts = admin_get(&http, &r.url, &token, "/api/v1/instances").await;
    let ids = strings_of(&hosts, "machine_id");
    assert_eq!(ids.len(), 30);
    assert_eq!((ids[0].as_str(), ids[29].as_str()), ("b00", "b29"));
    let releases = admin_get(&http, &r.url, &token, "/api/v1/releases").await;
    assert_eq!(releases[0]["version"], "2.0.0");
    r.terminate();
}

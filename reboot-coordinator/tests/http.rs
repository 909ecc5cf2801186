//! The FleetLock HTTP server: protocol, errors, windows, auth, metrics, etcd outages.

mod common;

use common::{TestServer, answer, fleetlock, http};
use reboot_coordinator::server::{FixedClock, ServerConfig};
use reboot_coordinator::testing::EtcdCluster;
use reboot_coordinator::window::WindowSet;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const PRE: &str = "/v1/pre-reboot";
const STEADY: &str = "/v1/steady-state";

/// One raw request and the expected (status, kind).
async fn check(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    header: Option<&str>,
    body: &str,
    expected: (u16, &str),
) {
    let mut req = client.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(h) = header {
        req = req.header("fleet-lock-protocol", h);
    }
    let a = answer(req.body(body.to_string()).send().await.unwrap()).await;
    assert_eq!(
        (a.status, a.kind()),
        expected,
        "{method} {path} header {header:?} body {body}: {a:?}"
    );
}

#[tokio::test]
async fn protocol_errors_and_success() {
    let etcd = EtcdCluster::start_single().await;
    let server = TestServer::start(etcd.endpoints(), 60, ServerConfig::default()).await;
    let store = server.coordinator.semaphore.store();
    store.set_slots("default", 1).await.unwrap();
    let c = http();
    let base = server.url.as_str();
    let ok = r#"{"client_params":{"id":"node-1","group":"default"}}"#;
    let t = Some("true");
    for path in [PRE, STEADY] {
        check(
            &c,
            base,
            "POST",
            path,
            None,
            ok,
            (400, "missing_protocol_header"),
        )
        .await;
        check(
            &c,
            base,
            "POST",
            path,
            Some("false"),
            ok,
            (400, "missing_protocol_header"),
        )
        .await;
        check(&c, base, "POST", path, t, "{not json", (400, "bad_request")).await;
        check(&c, base, "POST", path, t, "", (400, "bad_request")).await;
        check(
            &c,
            base,
            "POST",
            path,
            t,
            r#"{"client_params":{"id":"x"}}"#,
            (400, "bad_request"),
        )
        .await;
        let bad_group = r#"{"client_params":{"id":"node-1","group":"no/slashes"}}"#;
        check(&c, base, "POST", path, t, bad_group, (400, "invalid_group")).await;
        let empty_group = r#"{"client_params":{"id":"node-1","group":""}}"#;
        check(
            &c,
            base,
            "POST",
            path,
            t,
            empty_group,
            (400, "invalid_group"),
        )
        .await;
        let bad_id = r#"{"client_params":{"id":"a b","group":"default"}}"#;
        check(&c, base, "POST", path, t, bad_id, (400, "invalid_id")).await;
        check(&c, base, "GET", path, t, "", (405, "method_not_allowed")).await;
        check(&c, base, "PUT", path, t, ok, (405, "method_not_allowed")).await;
    }
    check(&c, base, "POST", "/v1/unknown", t, ok, (404, "not_found")).await;
    check(&c, base, "GET", "/", None, "", (404, "not_found")).await;

    // Success, idempotence, and the slot being busy for someone else.
    check(&c, base, "POST", PRE, t, ok, (200, "ok")).await;
    check(&c, base, "POST", PRE, t, ok, (200, "ok")).await;
    let other = r#"{"client_params":{"id":"node-2","group":"default"}}"#;
    check(&c, base, "POST", PRE, t, other, (409, "no_slot_available")).await;
    check(&c, base, "POST", STEADY, t, ok, (200, "ok")).await;
    check(&c, base, "POST", STEADY, t, ok, (200, "ok")).await;
    check(&c, base, "POST", PRE, t, other, (200, "ok")).await;
    // Zincati sends "fleet-lock-protocol: true" with a JSON content type; any case of "true" goes.
    check(&c, base, "POST", STEADY, Some("True"), other, (200, "ok")).await;

    let m = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "reboot_coordinator_grants_total 2",
        "reboot_coordinator_renewals_total 1",
        "reboot_coordinator_releases_total 2",
        "reboot_coordinator_releases_not_held_total 1",
        "reboot_coordinator_refusals_total{kind=\"no_slot_available\"} 1",
        "reboot_coordinator_refusals_total{kind=\"missing_protocol_header\"} 4",
        "reboot_coordinator_refusals_total{kind=\"not_found\"} 2",
        "reboot_coordinator_etcd_up 1",
        "reboot_coordinator_group_slots{group=\"default\"} 1",
        "reboot_coordinator_group_holders{group=\"default\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bearer_token_and_reboot_windows() {
    let etcd = EtcdCluster::start_single().await;
    // 2024-01-01 (a Monday) 12:00 UTC.
    let monday_noon = 1_704_067_200 + 12 * 3600;
    let mut windows = HashMap::new();
    windows.insert(
        "night".to_string(),
        WindowSet(vec!["Mon-Fri 02:00-05:00".parse().unwrap()]),
    );
    windows.insert(
        "day".to_string(),
        WindowSet(vec![
            "Sat 00:00-24:00".parse().unwrap(),
            "Mon 11:00-13:00".parse().unwrap(),
        ]),
    );
    let config = ServerConfig {
        windows,
        bearer_token: Some("s3cret".into()),
        clock: Box::new(FixedClock(monday_noon)),
    };
    let server = TestServer::start(etcd.endpoints(), 60, config).await;
    let c = http();
    let base = server.url.as_str();
    let body = r#"{"client_params":{"id":"node-1","group":"night"}}"#;
    let send = |token: Option<&'static str>, path: &'static str, body: &'static str| {
        let mut req = c
            .post(format!("{base}{path}"))
            .header("fleet-lock-protocol", "true")
            .body(body);
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        async move { answer(req.send().await.unwrap()).await }
    };
    let a = send(None, PRE, body).await;
    assert_eq!((a.status, a.kind()), (401, "unauthorized"));
    let a = send(Some("Bearer wrong"), PRE, body).await;
    assert_eq!((a.status, a.kind()), (401, "unauthorized"));
    let a = send(Some("Bearer s3cret"), PRE, body).await;
    assert_eq!((a.status, a.kind()), (409, "outside_reboot_window"));
    assert!(
        a.error.unwrap().value.contains("Mon-Fri 02:00-05:00"),
        "the refusal names the window"
    );
    let day = r#"{"client_params":{"id":"node-1","group":"day"}}"#;
    let a = send(Some("Bearer s3cret"), PRE, day).await;
    assert_eq!((a.status, a.kind()), (200, "ok"));
    // Groups without windows are always open.
    let any = r#"{"client_params":{"id":"node-1","group":"anytime"}}"#;
    let a = send(Some("Bearer s3cret"), PRE, any).await;
    assert_eq!((a.status, a.kind()), (200, "ok"));
    let a = send(Some("Bearer s3cret"), STEADY, day).await;
    assert_eq!((a.status, a.kind()), (200, "ok"));
    server.stop().await;
}

#[tokio::test]
async fn holder_keeps_slot_outside_window_once_granted() {
    let etcd = EtcdCluster::start_single().await;
    // Grant inside the window through one server, then renew through one whose clock is outside.
    let mut windows = HashMap::new();
    windows.insert(
        "g".to_string(),
        WindowSet(vec!["Mon 11:00-13:00".parse().unwrap()]),
    );
    let inside = ServerConfig {
        windows: windows.clone(),
        clock: Box::new(FixedClock(1_704_067_200 + 12 * 3600)),
        ..Default::default()
    };
    let outside = ServerConfig {
        windows,
        clock: Box::new(FixedClock(1_704_067_200 + 14 * 3600)),
        ..Default::default()
    };
    let s1 = TestServer::start(etcd.endpoints(), 60, inside).await;
    let s2 = TestServer::start(etcd.endpoints(), 60, outside).await;
    let c = http();
    assert_eq!(fleetlock(&c, &s1.url, PRE, "a", "g").await.status, 200);
    assert_eq!(fleetlock(&c, &s2.url, PRE, "a", "g").await.status, 200);
    assert_eq!(
        fleetlock(&c, &s2.url, PRE, "b", "g").await.kind(),
        "outside_reboot_window"
    );
    assert_eq!(fleetlock(&c, &s2.url, STEADY, "a", "g").await.status, 200);
    s1.stop().await;
    s2.stop().await;
}

#[tokio::test]
async fn etcd_stopped_refuses_with_etcd_kind_and_recovers() {
    let mut etcd = EtcdCluster::start_single().await;
    let server = TestServer::start(etcd.endpoints(), 60, ServerConfig::default()).await;
    let c = http();
    let base = server.url.clone();
    assert_eq!(fleetlock(&c, &base, PRE, "a", "default").await.status, 200);
    etcd.kill(0);
    let a = fleetlock(&c, &base, PRE, "b", "default").await;
    assert_eq!((a.status, a.kind()), (503, "etcd_unavailable"), "{a:?}");
    assert!(a.error.unwrap().value.contains(&etcd.endpoint(0)));
    let a = fleetlock(&c, &base, STEADY, "a", "default").await;
    assert_eq!((a.status, a.kind()), (503, "etcd_unavailable"));
    let m = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("reboot_coordinator_etcd_up 0"), "{m}");
    assert!(m.contains("reboot_coordinator_refusals_total{kind=\"etcd_unavailable\"} 2"));

    etcd.restart(0).await;
    // The same server recovers; "a" still holds the slot it had before the outage.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = fleetlock(&c, &base, PRE, "b", "default").await;
        match a.kind() {
            "no_slot_available" => break,
            "etcd_unavailable" => assert!(Instant::now() < deadline, "never recovered"),
            other => panic!("unexpected {other}: {a:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fleetlock(&c, &base, STEADY, "a", "default").await.status,
        200
    );
    assert_eq!(fleetlock(&c, &base, PRE, "b", "default").await.status, 200);
    server.stop().await;
}

//! The `reboot-coordinator` binary: several serve processes sharing etcd, and the admin commands.

mod common;

use common::{CoordinatorProcess, Jitter, fleetlock, http, run_cli};
use reboot_coordinator::etcd_store::DEFAULT_PREFIX;
use reboot_coordinator::testing::{EtcdCluster, HolderHistory, free_port, holder_history};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PRE: &str = "/v1/pre-reboot";
const STEADY: &str = "/v1/steady-state";

/// What one client saw: when its grant answer arrived and when it sent its release. The real
/// holding interval in etcd contains [granted, releasing], so overlaps here are real overlaps.
struct ClientRecord {
    granted: Instant,
    releasing: Instant,
}

/// One FleetLock client: pre-reboot until granted (retrying retryable refusals), "reboot", then
/// steady-state until acknowledged.
async fn client_run(
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    i: usize,
    group: &'static str,
    granted_count: Arc<AtomicUsize>,
) -> ClientRecord {
    let id = format!("node-{i:03}");
    let mut jitter = Jitter::new(i as u64 + 1);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut attempt = i;
    loop {
        let url = &urls[attempt % urls.len()];
        let a = fleetlock(&client, url, PRE, &id, group).await;
        match a.kind() {
            "ok" => break,
            "no_slot_available" | "etcd_unavailable" | "etcd_error" => {}
            other => panic!("{id}: unexpected answer {other}: {a:?}"),
        }
        assert!(Instant::now() < deadline, "{id} never got a slot");
        attempt += 1;
        tokio::time::sleep(jitter.millis(30, 150)).await;
    }
    let granted = Instant::now();
    granted_count.fetch_add(1, Ordering::Relaxed);
    // The "reboot".
    tokio::time::sleep(jitter.millis(2, 10)).await;
    let releasing = Instant::now();
    loop {
        let url = &urls[attempt % urls.len()];
        let a = fleetlock(&client, url, STEADY, &id, group).await;
        match a.kind() {
            "ok" => break,
            "etcd_unavailable" | "etcd_error" => {}
            other => panic!("{id}: unexpected answer to steady-state {other}: {a:?}"),
        }
        assert!(Instant::now() < deadline, "{id} could never release");
        attempt += 1;
        tokio::time::sleep(jitter.millis(20, 60)).await;
    }
    ClientRecord { granted, releasing }
}

/// Largest number of client-observed holding intervals that overlap.
fn max_overlap(records: &[ClientRecord]) -> usize {
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for r in records {
        events.push((r.granted, 1));
        events.push((r.releasing, -1));
    }
    // Ends before starts at the same instant.
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

fn check_history(h: &HolderHistory, clients: usize, slots: usize) {
    assert!(
        h.max_concurrent <= slots,
        "over-grant: {} holders at once with {slots} slots",
        h.max_concurrent
    );
    assert_eq!(h.grants.len(), clients, "every client got a slot: {h:?}");
    assert!(
        h.grants.values().all(|n| *n == 1),
        "one grant per client: {h:?}"
    );
    assert_eq!(h.removals, clients);
    assert_eq!(h.live_at_end, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_200_clients_two_coordinators_three_slots() {
    let etcd = EtcdCluster::start_single().await;
    let endpoint = etcd.endpoint(0);
    let (ok, out, err) = run_cli(&["set-slots", "--etcd", &endpoint, "--group", "fleet", "3"]);
    assert!(ok, "set-slots failed: {out}{err}");
    let p1 = CoordinatorProcess::spawn(&etcd.endpoints(), &["--lease-seconds", "120"]);
    let p2 = CoordinatorProcess::spawn(&etcd.endpoints(), &["--lease-seconds", "120"]);
    let urls = Arc::new(vec![p1.url.clone(), p2.url.clone()]);
    let client = http();
    let granted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(client_run(
                client.clone(),
                urls.clone(),
                i,
                "fleet",
                granted.clone(),
            ))
        })
        .collect();
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await.unwrap());
    }
    assert_eq!(records.len(), 200);
    let seen = max_overlap(&records);
    assert!(seen <= 3, "clients saw {seen} holders at once");
    let h = holder_history(&endpoint, DEFAULT_PREFIX, "fleet").await;
    check_history(&h, 200, 3);
    // Both processes served grants, and their metrics add up.
    let mut grants = 0;
    for url in urls.iter() {
        let m = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("reboot_coordinator_grants_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0, "{url} granted nothing");
        grants += n;
    }
    assert_eq!(grants, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_with_a_member_killed_mid_run() {
    let mut etcd = EtcdCluster::start(3).await;
    let endpoints = etcd.endpoints();
    let (ok, out, err) = run_cli(&[
        "set-slots",
        "--etcd",
        &endpoints.join(","),
        "--group",
        "workers",
        "2",
    ]);
    assert!(ok, "set-slots failed: {out}{err}");
    let p1 = CoordinatorProcess::spawn(&endpoints, &["--lease-seconds", "120"]);
    let p2 = CoordinatorProcess::spawn(&endpoints, &["--lease-seconds", "120"]);
    let urls = Arc::new(vec![p1.url.clone(), p2.url.clone()]);
    let client = http();
    let granted = Arc::new(AtomicUsize::new(0));
    let clients = 60;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(client_run(
                client.clone(),
                urls.clone(),
                i,
                "workers",
                granted.clone(),
            ))
        })
        .collect();
    // Kill the raft leader once the run is well under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while granted.load(Ordering::Relaxed) < 15 {
        assert!(Instant::now() < deadline, "run never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = etcd.leader().await;
    etcd.kill(leader);
    let mut records = Vec::new();
    for t in tasks {
        records.push(t.await.unwrap());
    }
    assert!(max_overlap(&records) <= 2);
    let survivor = (leader + 1) % 3;
    let h = holder_history(&etcd.endpoint(survivor), DEFAULT_PREFIX, "workers").await;
    check_history(&h, clients, 2);
}

#[tokio::test]
async fn admin_commands() {
    let etcd = EtcdCluster::start_single().await;
    let ep = etcd.endpoint(0);
    let mut p = CoordinatorProcess::spawn(
        &etcd.endpoints(),
        &["--group", "web=2", "--lease-seconds", "300"],
    );
    let c = http();
    // The seeded group: two slots.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, _) = run_cli(&["status", "--etcd", &ep]);
        if ok && out.contains("group web: 0 of 2 slots held") {
            break;
        }
        assert!(Instant::now() < deadline, "group never seeded: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fleetlock(&c, &p.url, PRE, "web-1", "web").await.status, 200);
    assert_eq!(fleetlock(&c, &p.url, PRE, "web-2", "web").await.status, 200);
    assert_eq!(
        fleetlock(&c, &p.url, PRE, "web-3", "web").await.kind(),
        "no_slot_available"
    );
    let (ok, out, err) = run_cli(&["status", "--etcd", &ep]);
    assert!(ok, "{err}");
    assert!(out.contains("group web: 2 of 2 slots held"), "{out}");
    assert!(out.contains("  web-1  held "), "{out}");
    assert!(out.contains("expires in "), "{out}");
    assert!(
        out.contains("granted group=web id=web-2 pre-reboot: slot "),
        "{out}"
    );

    // Operator release frees a slot; releasing again is a no-op.
    let (ok, out, _) = run_cli(&["release", "--etcd", &ep, "--group", "web", "--id", "web-1"]);
    assert!(ok);
    assert_eq!(out, "released web-1 in group web\n");
    let (ok, out, _) = run_cli(&["release", "--etcd", &ep, "--group", "web", "--id", "web-1"]);
    assert!(ok);
    assert_eq!(out, "web-1 held no slot in group web\n");
    assert_eq!(fleetlock(&c, &p.url, PRE, "web-3", "web").await.status, 200);

    // Raising the count at run time takes effect at once.
    assert_eq!(
        fleetlock(&c, &p.url, PRE, "web-4", "web").await.kind(),
        "no_slot_available"
    );
    let (ok, out, _) = run_cli(&["set-slots", "--etcd", &ep, "--group", "web", "3"]);
    assert!(ok);
    assert_eq!(out, "group web now has 3 reboot slots\n");
    assert_eq!(fleetlock(&c, &p.url, PRE, "web-4", "web").await.status, 200);
    let (_, out, _) = run_cli(&["status", "--etcd", &ep]);
    assert!(out.contains("group web: 3 of 3 slots held"), "{out}");
    assert!(
        out.contains("released group=web id=web-1 released by operator"),
        "{out}"
    );

    // Bad input: clear errors and a non-zero exit.
    let (ok, _, err) = run_cli(&["set-slots", "--etcd", &ep, "--group", "a/b", "3"]);
    assert!(!ok);
    assert!(err.contains("invalid group \"a/b\""), "{err}");
    let (ok, _, err) = run_cli(&["release", "--etcd", &ep, "--group", "web", "--id", ""]);
    assert!(!ok);
    assert!(err.contains("invalid node id"), "{err}");
    let (ok, _, err) = run_cli(&["status", "--etcd", "localhost:2379"]);
    assert!(!ok);
    assert!(
        err.contains("invalid etcd endpoint \"localhost:2379\""),
        "{err}"
    );
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (ok, _, err) = run_cli(&["status", "--etcd", &dead, "--etcd-timeout-ms", "500"]);
    assert!(!ok);
    assert!(
        err.contains("etcd unavailable") && err.contains(&dead),
        "{err}"
    );
    let (ok, _, err) = run_cli(&[
        "serve",
        "--etcd",
        &ep,
        "--listen",
        "127.0.0.1:0",
        "--window",
        "web=Mon 25:00-26:00",
    ]);
    assert!(!ok);
    assert!(
        err.contains("invalid reboot window \"Mon 25:00-26:00\""),
        "{err}"
    );
    // SIGTERM: clean shutdown, exit status 0.
    assert!(p.terminate(), "serve did not exit cleanly on SIGTERM");
}

#[tokio::test]
async fn tls_bearer_token_and_expiry_through_the_binary() {
    let etcd = EtcdCluster::start_single().await;
    let dir = tempfile::tempdir().unwrap();
    // A throwaway CA and a server certificate for 127.0.0.1 signed by it.
    let ca_cert = dir.path().join("ca.pem");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=test CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "req.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.path().join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let p = CoordinatorProcess::spawn(
        &etcd.endpoints(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--lease-seconds",
            "2",
        ],
    );
    assert!(p.url.starts_with("https://127.0.0.1:"), "{}", p.url);
    common::install_crypto();
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca_cert).unwrap()).unwrap(),
        )
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let post = |id: &str, auth: Option<&str>| {
        let mut req = client
            .post(format!("{}{PRE}", p.url))
            .header("fleet-lock-protocol", "true")
            .json(&twinroot_format::fleetlock::Request::new(id, "default"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move { common::answer(req.send().await.unwrap()).await }
    };
    assert_eq!(post("gone", None).await.kind(), "unauthorized");
    assert_eq!(post("gone", Some("Bearer t0ken")).await.kind(), "ok");
    assert_eq!(
        post("next", Some("Bearer t0ken")).await.kind(),
        "no_slot_available"
    );
    // "gone" never comes back: its 2 s lease expires and "next" gets the slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = post("next", Some("Bearer t0ken")).await;
        match a.kind() {
            "ok" => break,
            "no_slot_available" => assert!(Instant::now() < deadline, "slot never expired"),
            other => panic!("unexpected {other}: {a:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The expiry shows in the metrics and in the activity log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = client
            .get(format!("{}/metrics", p.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.lines()
            .any(|l| l == "reboot_coordinator_expiries_total 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "expiry never counted:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, _) = run_cli(&["status", "--etcd", &etcd.endpoint(0)]);
    assert!(ok);
    assert!(out.contains("expired group=default id=gone"), "{out}");
}

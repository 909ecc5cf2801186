//! Fleet simulator scenarios against a real update-server (SQLite) and a real reboot-coordinator
//! on a real etcd, all on loopback free ports: the simulated hosts run the real agent core and
//! talk real HTTP.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reboot_coordinator::etcd_store::{EtcdConfig, EtcdStore};
use reboot_coordinator::metrics::Metrics;
use reboot_coordinator::semaphore::{Semaphore, SemaphoreConfig};
use reboot_coordinator::testing::EtcdCluster;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use twinroot_format::bundle::{ReleaseInfo, write_bundle};
use twinroot_format::keyring::{Keyring, generate_signing_key};
use update_agent::simulate::{self, SimOptions};
use update_server::server::{self, ServerConfig};
use update_server::store::Role;

struct Fleet {
    _dir: tempfile::TempDir,
    _etcd: EtcdCluster,
    server_url: String,
    coordinator_url: String,
    admin: String,
    key: ed25519_dalek::SigningKey,
    keyring: Keyring,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Fleet {
    async fn start(slots: u32) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_signing_key().unwrap();
        let keyring = Keyring::new(1, 1, &[key.verifying_key()]).unwrap();
        let keyring_path = dir.path().join("release.keyring");
        std::fs::write(&keyring_path, keyring.to_bytes()).unwrap();
        let stop = CancellationToken::new();

        let mut cfg = ServerConfig::new(dir.path().join("server"));
        cfg.keyring = Some(keyring_path);
        let state = server::open_state(cfg).await.unwrap();
        let admin = update_server::api::create_token(&state.store, Role::Admin, "sim")
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(server::run(listener, state, stop.clone()));

        let etcd = EtcdCluster::start_single().await;
        let mut ecfg = EtcdConfig::new(etcd.endpoints());
        ecfg.timeout = Duration::from_secs(5);
        let store = EtcdStore::connect(ecfg).await.unwrap();
        let coordinator = Arc::new(reboot_coordinator::server::Coordinator {
            semaphore: Semaphore::new(
                store,
                SemaphoreConfig {
                    default_slots: slots,
                    lease_seconds: 600,
                    max_attempts: 64,
                },
            ),
            config: reboot_coordinator::server::ServerConfig::default(),
            metrics: Metrics::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let coordinator_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(reboot_coordinator::server::run(
            listener,
            coordinator,
            stop.clone(),
        ));
        Fleet {
            _dir: dir,
            _etcd: etcd,
            server_url,
            coordinator_url,
            admin,
            key,
            keyring,
            http: update_server::http_client(),
            stop,
        }
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.server_url))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    /// Uploads a small signed bundle of `version` and promotes it to stable.
    async fn release(&self, version: &str) {
        let mut image = vec![0u8; 32 * 1024];
        for (i, b) in image.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(version.len() as u8 + 7);
        }
        let info = ReleaseInfo {
            os_version: semver::Version::parse(version).unwrap(),
            created_unix: 1_700_000_000,
            min_source_version: None,
            board: None,
        };
        let mut scratch = Cursor::new(Vec::new());
        let mut out = Vec::new();
        write_bundle(
            &image[..],
            &info,
            std::slice::from_ref(&self.key),
            3,
            &mut scratch,
            &mut out,
        )
        .unwrap();
        let resp = self
            .http
            .post(format!("{}/api/v1/releases", self.server_url))
            .bearer_auth(&self.admin)
            .body(out)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "upload {version}");
        self.api(
            reqwest::Method::POST,
            &format!("/releases/{version}/promote"),
            Some(json!({"channel": "stable", "force": true})),
        )
        .await;
    }

    async fn policy(&self, policy: Value) {
        self.api(
            reqwest::Method::PUT,
            "/rollouts/stable",
            Some(json!({"policy": policy})),
        )
        .await;
    }

    fn options(&self, hosts: usize) -> SimOptions {
        let mut o = SimOptions::new(hosts, &self.server_url, self.keyring.clone());
        o.coordinator = Some(self.coordinator_url.clone());
        o.interval = Duration::from_millis(500);
        o.reboot = Duration::from_millis(100);
        o.settle = Duration::from_secs(3);
        o.max_duration = Duration::from_secs(40);
        o.parallel = 16;
        o
    }

    /// Instances the server knows, by version.
    async fn server_versions(&self) -> std::collections::BTreeMap<String, usize> {
        let list = self
            .api(reqwest::Method::GET, "/instances?channel=stable", None)
            .await;
        let mut m = std::collections::BTreeMap::new();
        for i in list.as_array().unwrap() {
            *m.entry(i["version"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        m
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_release_reaches_every_host_within_the_reboot_slots() {
    let fleet = Fleet::start(4).await;
    fleet.release("2.0.0").await;
    fleet
        .policy(json!({"start_percent": 10, "ramp": {"kind": "linear", "duration_secs": 4}}))
        .await;
    let mut o = fleet.options(100);
    o.until_all_on = Some("2.0.0".into());
    let started = Instant::now();
    let report = simulate::run(o).await.unwrap();
    eprintln!("{}({:?})", report.render(), started.elapsed());
    assert_eq!(report.ended, "all_on_version", "{}", report.render());
    let v2 = report.version("2.0.0").unwrap();
    assert_eq!(
        (
            v2.hosts_booted,
            v2.failed,
            v2.rolled_back,
            v2.running_at_end
        ),
        (100, 0, 0, 100)
    );
    assert!(v2.t50.is_some() && v2.t100.is_some());
    // The coordinator's 4 slots were used and never exceeded.
    assert!(
        (1..=4).contains(&report.max_lock_holders),
        "{}",
        report.render()
    );
    assert!(report.max_rebooting <= 4, "{}", report.render());
    // Every host was installed, rebooted and released its slot; the server saw the same fleet.
    let count = |e: &str| report.timeline.iter().filter(|x| x.event == e).count();
    assert_eq!(count("installed"), 100);
    assert_eq!(count("lock_granted"), 100);
    assert_eq!(count("lock_released"), 100);
    // The server records the completion when the event arrives; poll for the last ones.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = fleet.server_versions().await;
        if seen.get("2.0.0") == Some(&100) || Instant::now() > deadline {
            assert_eq!(seen.get("2.0.0"), Some(&100), "{seen:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_release_is_halted_and_every_affected_host_rolls_back() {
    let fleet = Fleet::start(5).await;
    fleet.release("2.0.0").await;
    // 15% of 200 hosts eligible (about 30); halt at 5% failures once 20 hosts reported.
    fleet
        .policy(json!({"start_percent": 15, "halt": {"max_failure_percent": 5, "min_reports": 20}}))
        .await;
    let mut o = fleet.options(200);
    o.health = vec!["2.0.0:fail=100%".parse().unwrap()];
    let report = simulate::run(o).await.unwrap();
    eprintln!("{}", report.render());
    assert_eq!(report.ended, "settled", "{}", report.render());
    let bad = report.version("2.0.0").unwrap();
    // The blast radius: at least the 20 reports the halt waits for, at most the eligible cohort.
    assert!((20..=45).contains(&bad.hosts_booted), "{}", report.render());
    assert_eq!(bad.failed, bad.hosts_booted);
    assert_eq!(bad.rolled_back, bad.hosts_booted);
    assert_eq!(bad.running_at_end, 0);
    assert_eq!(report.version("1.0.0").unwrap().running_at_end, 200);
    assert!(report.max_lock_holders <= 5);
    // The rollout is paused with the reason recorded.
    let shown = fleet
        .api(reqwest::Method::GET, "/rollouts/stable", None)
        .await;
    assert_eq!(shown["paused"], true, "{shown}");
    assert_eq!(shown["auto_halted"], true, "{shown}");
    let reason = shown["pause_reason"].as_str().unwrap();
    assert!(reason.starts_with("automatic halt: "), "{reason}");
    // Nobody was offered the release after the hosts settled: no host installs it twice.
    let installs = report
        .timeline
        .iter()
        .filter(|e| e.event == "installed")
        .count();
    assert_eq!(installs, bad.hosts_booted, "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subcommand_prints_the_summary_writes_the_timeline_and_names_bad_input() {
    let fleet = Fleet::start(3).await;
    fleet.release("2.0.0").await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    std::fs::write(&keyring, fleet.keyring.to_bytes()).unwrap();
    let bin = env!("CARGO_BIN_EXE_update-agent");
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .arg("simulate")
                .args(args)
                .env("UPDATE_AGENT_LOG", "warn")
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let common = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--hosts",
            "20",
            "--server",
            &fleet.server_url,
            "--coordinator",
            &fleet.coordinator_url,
            "--keyring",
            keyring.to_str().unwrap(),
            "--interval-secs",
            "1",
            "--reboot-secs",
            "0.5",
            "--time-scale",
            "2",
            "--max-secs",
            "60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let csv = dir.path().join("timeline.csv");
    let out = run(common(&[
        "--until-all-on",
        "2.0.0",
        "--csv",
        csv.to_str().unwrap(),
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ended: all_on_version"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("2.0.0") && l.split_whitespace().nth(1) == Some("20")),
        "{stdout}"
    );
    let timeline = std::fs::read_to_string(&csv).unwrap();
    assert!(timeline.starts_with("t,host,event,version,detail\n"));
    assert_eq!(
        timeline
            .lines()
            .filter(|l| l.contains(",booted,2.0.0,"))
            .count(),
        20
    );

    for (bad, named) in [
        (vec!["--health", "2.0.0:fail=300%"], "300"),
        (vec!["--board-share", "X"], "BOARD=P%"),
        (vec!["--time-scale", "0"], "--time-scale"),
    ] {
        let out = run(common(&bad)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(stderr.contains(named), "{bad:?}: {stderr}");
    }
    let mut args = common(&[]);
    let k = args.iter().position(|a| a == "--keyring").unwrap();
    args[k + 1] = dir.path().join("missing.json").display().to_string();
    let out = run(args).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.json"), "{stderr}");
}

//! Fleet simulator scenarios against a real update-server process (SQLite) and a real
//! reboot-coordinator process on a real etcd, all on loopback free ports: the simulated hosts run
//! the real agent core and talk real HTTP. Server and hosts share one time scale, so a day-long
//! ramp plays in seconds.
//!
//! Needs the server and coordinator binaries next to the test binary (`cargo build -p
//! update-server -p reboot-coordinator`) or in `TWINROOT_BIN_DIR`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reboot_coordinator::etcd_store::DEFAULT_PREFIX;
use reboot_coordinator::testing::{EtcdCluster, free_port, holder_history};
use serde_json::{Value, json};
use twinroot_format::bundle::{ReleaseInfo, write_bundle};
use twinroot_format::keyring::{Keyring, generate_signing_key};
use update_agent::simulate::{self, Report, SimOptions};

/// A workspace binary: `TWINROOT_BIN_DIR`, else next to this test binary (target/debug).
fn binary(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("TWINROOT_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe().unwrap();
    candidates.extend(exe.ancestors().skip(1).take(2).map(|d| d.join(name)));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("binary {name} not found next to {} (cargo build -p {name}, or set TWINROOT_BIN_DIR)", exe.display())
        })
}

/// A server process on a fixed port that can be killed (SIGKILL) and started again.
struct Service {
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Service {
    /// Starts binary `name` with `args`, logging to `dir/NAME.log`.
    async fn start(dir: &std::path::Path, name: &str, args: &[&str], port: u16) -> Service {
        let mut s = Service {
            program: binary(name),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: dir.join(format!("{name}.log")),
            port,
            child: None,
        };
        s.restart().await;
        s
    }

    /// Starts the process (again, on the same port and data) and waits until it answers HTTP.
    async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "{} is running",
            self.program.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.program)
                .args(&self.args)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", self.program.display())),
        );
        let url = format!("http://127.0.0.1:{}/", self.port);
        let http = update_server::http_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(&url).send().await.is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited ({status}): {}",
                    self.program.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{url} never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9, and waits until the process is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    server: Service,
    coordinator: Service,
    server_url: String,
    coordinator_url: String,
    admin: String,
    key: ed25519_dalek::SigningKey,
    keyring: Keyring,
    http: reqwest::Client,
    /// Simulated seconds per real second, for the server and the hosts alike.
    time_scale: f64,
}

impl Fleet {
    async fn start(slots: u32, time_scale: f64) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_signing_key().unwrap();
        let keyring = Keyring::new(1, 1, &[key.verifying_key()]).unwrap();
        let keyring_path = dir.path().join("release.keyring");
        std::fs::write(&keyring_path, keyring.to_bytes()).unwrap();

        let data = dir.path().join("server");
        let data_arg = data.display().to_string();
        let out = Command::new(binary("update-server"))
            .args([
                "token",
                "create",
                "--data-dir",
                &data_arg,
                "--role",
                "admin",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let admin = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let keyring_arg = keyring_path.display().to_string();
        let scale_arg = time_scale.to_string();
        let server = Service::start(
            dir.path(),
            "update-server",
            &[
                "serve",
                "--listen",
                &listen,
                "--data-dir",
                &data_arg,
                "--keyring",
                &keyring_arg,
                "--time-scale",
                &scale_arg,
            ],
            port,
        )
        .await;

        let etcd = EtcdCluster::start_single().await;
        let cport = free_port();
        let listen = format!("127.0.0.1:{cport}");
        let (endpoint, slots_arg) = (etcd.endpoint(0), slots.to_string());
        let coordinator = Service::start(
            dir.path(),
            "reboot-coordinator",
            &[
                "serve",
                "--listen",
                &listen,
                "--etcd",
                &endpoint,
                "--default-slots",
                &slots_arg,
            ],
            cport,
        )
        .await;
        Fleet {
            dir,
            etcd,
            server,
            coordinator,
            server_url: format!("http://127.0.0.1:{port}"),
            coordinator_url: format!("http://127.0.0.1:{cport}"),
            admin,
            key,
            keyring,
            http: update_server::http_client(),
            time_scale,
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

    async fn get(&self, path: &str) -> Value {
        self.api(reqwest::Method::GET, path, None).await
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

    /// Sets the rollout policy of stable (of one group of it with `group`).
    async fn policy(&self, group: Option<&str>, policy: Value) {
        self.api(
            reqwest::Method::PUT,
            "/rollouts/stable",
            Some(json!({"group": group, "policy": policy})),
        )
        .await;
    }

    async fn rollout(&self, group: &str) -> Value {
        self.get(&format!("/rollouts/stable?group={group}")).await
    }

    /// `real` seconds of real time, in simulated seconds.
    fn sim(&self, real: f64) -> Duration {
        Duration::from_secs_f64(real * self.time_scale)
    }

    /// Options at the fleet's time scale; delays are given in real seconds for readability.
    fn options(&self, hosts: usize) -> SimOptions {
        let mut o = SimOptions::new(hosts, &self.server_url, self.keyring.clone());
        o.coordinator = Some(self.coordinator_url.clone());
        o.time_scale = self.time_scale;
        o.interval = self.sim(0.5);
        o.reboot = self.sim(0.1);
        o.settle = self.sim(3.0);
        o.max_duration = self.sim(40.0);
        o.parallel = 16;
        o
    }

    /// The server's host records of stable, by machine id.
    async fn instances(&self) -> BTreeMap<String, Value> {
        let list = self.get("/instances?channel=stable").await;
        list.as_array()
            .unwrap()
            .iter()
            .map(|i| (i["machine_id"].as_str().unwrap().to_string(), i.clone()))
            .collect()
    }

    /// Polls the server until `done` holds for its host records (the last events may still be
    /// in flight when the simulator stops).
    async fn wait_instances(
        &self,
        what: &str,
        done: impl Fn(&BTreeMap<String, Value>) -> bool,
    ) -> BTreeMap<String, Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.instances().await;
            if done(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "{what}: {seen:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What etcd's own history says about the reboot slots of the FleetLock group `default`.
    async fn slot_history(&self) -> reboot_coordinator::testing::HolderHistory {
        holder_history(&self.etcd.endpoint(0), DEFAULT_PREFIX, "default").await
    }

    fn logs(&self) -> String {
        ["update-server.log", "reboot-coordinator.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- {f} (last lines)\n{}\n",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

fn count(report: &Report, event: &str) -> usize {
    report.timeline.iter().filter(|e| e.event == event).count()
}

/// Scenario 1 under the shared time scale: a 24 h linear ramp from 1% plays in about ten real
/// seconds; every host ends on 2.0.0 within the reboot slots, and the server's records and graphs
/// agree with the simulator's own counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_release_with_a_day_long_ramp_reaches_every_host_within_the_reboot_slots() {
    // One simulated day in 8 real seconds.
    let fleet = Fleet::start(4, 86_400.0 / 8.0).await;
    fleet.release("2.0.0").await;
    fleet
        .policy(
            None,
            json!({"start_percent": 1, "ramp": {"kind": "linear", "duration_secs": 86_400}}),
        )
        .await;
    let mut o = fleet.options(100);
    o.until_all_on = Some("2.0.0".into());
    o.max_duration = fleet.sim(60.0);
    let report = simulate::run(o).await.unwrap();
    eprintln!("{}", report.render());
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
    // The ramp, not the slots, paced it: the rollout took most of the simulated day.
    assert!(v2.t100.unwrap() > 12.0 * 3600.0, "{}", report.render());
    // Never more than 4 reboot-slot holders, as the hosts saw it and as etcd recorded it; every
    // host took a slot once, rebooted once and released it.
    assert!(
        (1..=4).contains(&report.max_lock_holders),
        "{}",
        report.render()
    );
    assert!(report.max_rebooting <= 4, "{}", report.render());
    let slots = fleet.slot_history().await;
    assert!(slots.max_concurrent <= 4, "{slots:?}");
    assert_eq!(slots.grants.len(), 100, "{slots:?}");
    assert!(slots.grants.values().all(|&n| n == 1), "{slots:?}");
    assert_eq!(slots.live_at_end, 0, "{slots:?}");
    assert_eq!(
        (
            count(&report, "installed"),
            report.reboots,
            report.extra_reboots
        ),
        (100, 100, 0)
    );

    // The server's records: every host complete on 2.0.0.
    fleet
        .wait_instances("every host complete on 2.0.0", |seen| {
            seen.len() == 100
                && seen
                    .values()
                    .all(|i| i["version"] == "2.0.0" && i["status"] == "complete")
        })
        .await;
    // The server's graphs (the dashboard's series) count the same rollout.
    let s = fleet.get("/series/stable?range=week").await;
    assert_eq!(s["hosts"], json!({"2.0.0": 100}), "{s}");
    assert_eq!(
        (s["total_hosts"].as_u64(), s["updated_hosts"].as_u64()),
        (Some(100), Some(100))
    );
    let series = &s["series"];
    let ints = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap_or(0))
            .collect()
    };
    let on_new = ints(&series["versions"]["2.0.0"]);
    assert_eq!(on_new.last(), Some(&100), "{series}");
    assert!(
        on_new.windows(2).all(|w| w[0] <= w[1]),
        "not monotonic: {on_new:?}"
    );
    // As in the simulator's timeline, hosts moved over during many hours, not all at once.
    let partial_buckets = on_new.iter().filter(|&&n| n > 0 && n < 100).count();
    let sim_hours: BTreeSet<u64> = report
        .timeline
        .iter()
        .filter(|e| e.event == "booted" && e.version == "2.0.0")
        .map(|e| (e.t / 3600.0) as u64)
        .collect();
    assert!(sim_hours.len() > 6, "{sim_hours:?}");
    assert!(partial_buckets > 6, "{on_new:?}");
    let sum = |k: &str| ints(&series[k]).iter().sum::<u64>();
    assert_eq!((sum("successes"), sum("failures")), (100, 0), "{series}");
    // Every host was eligible, so the ramp (the server's own clock) had passed the highest
    // cohort bucket of the 100 hosts.
    assert!(s["current_percent"].as_f64().unwrap() >= 90.0, "{s}");
}

/// Scenario 2: a release failing post-boot on every host is halted early; every host that
/// booted it rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_release_is_halted_and_every_affected_host_rolls_back() {
    let fleet = Fleet::start(5, 1.0).await;
    fleet.release("2.0.0").await;
    // 15% of 200 hosts eligible (about 30); halt at 5% failures once 20 hosts reported.
    fleet
        .policy(
            None,
            json!({"start_percent": 15, "halt": {"max_failure_percent": 5, "min_reports": 20}}),
        )
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
    // Into the bad release and back: two reboots each, no more.
    assert_eq!(report.extra_reboots, 0, "{}", report.render());
    // The rollout is paused with the reason recorded.
    let shown = fleet.rollout("").await;
    assert_eq!(shown["paused"], true, "{shown}");
    assert_eq!(shown["auto_halted"], true, "{shown}");
    let reason = shown["pause_reason"].as_str().unwrap();
    assert!(reason.starts_with("automatic halt: "), "{reason}");
    // Nobody was offered the release after the hosts settled: no host installs it twice.
    assert_eq!(
        count(&report, "installed"),
        bad.hosts_booted,
        "{}",
        report.render()
    );
    // The server's graphs count what the hosts did: each failure once, no success.
    let s = fleet.get("/series/stable?range=day").await;
    let failures: u64 = s["series"]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap_or(0))
        .sum();
    let statuses = |k: &str| -> u64 {
        s["series"]["statuses"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap_or(0))
            .sum()
    };
    let n = bad.hosts_booted as u64;
    assert_eq!((statuses("error"), statuses("rolled_back")), (n, n), "{s}");
    // Each host reports its failed boot and then its rollback; the failures series counts
    // reports (both), the halt counts hosts.
    assert!(failures >= n, "{failures} vs {n}: {s}");
    assert_eq!(s["halt_failures"].as_u64(), Some(n), "{s}");
    assert_eq!(s["halt_reports"].as_u64(), Some(n), "{s}");
    assert_eq!(s["hosts"], json!({"1.0.0": 200}), "{s}");
}

/// Scenario 4: the update-server and then the reboot-coordinator are killed (SIGKILL) in the
/// middle of a rollout and started again on the same data and port (etcd keeps running).
/// Nothing is lost: every host ends on 2.0.0, the server's records agree with the simulator,
/// no host took a reboot slot or rebooted twice, the slots were never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_coordinator_restarts_mid_rollout_lose_nothing() {
    let mut fleet = Fleet::start(5, 1.0).await;
    fleet.release("2.0.0").await;
    fleet
        .policy(
            None,
            json!({"start_percent": 10, "ramp": {"kind": "linear", "duration_secs": 6}}),
        )
        .await;
    let hosts = 200;
    let mut o = fleet.options(hosts);
    o.until_all_on = Some("2.0.0".into());
    let seed = o.seed.clone();
    let sim = tokio::spawn(simulate::run(o));

    let complete = |seen: &BTreeMap<String, Value>| {
        seen.values().filter(|i| i["status"] == "complete").count()
    };
    fleet
        .wait_instances("a third of the fleet complete", |s| {
            complete(s) >= hosts / 3
        })
        .await;
    // Each outage lasts two check intervals (the fault, not a wait for a condition).
    let outage = Duration::from_secs(1);
    fleet.server.kill();
    tokio::time::sleep(outage).await;
    fleet.server.restart().await;
    fleet
        .wait_instances("two thirds of the fleet complete", |s| {
            complete(s) >= 2 * hosts / 3
        })
        .await;
    fleet.coordinator.kill();
    tokio::time::sleep(outage).await;
    fleet.coordinator.restart().await;

    let report = sim.await.unwrap().unwrap();
    eprintln!("{}", report.render());
    let why = || format!("{}{}", report.render(), fleet.logs());
    // A host that booted 2.0.0 while the server was down keeps its boot pending (its built-in
    // server-reachable check is retried within the grace period) instead of rolling back: no
    // host fails, every host ends on 2.0.0.
    let v2 = report.version("2.0.0").unwrap();
    assert_eq!(
        (
            v2.hosts_booted,
            v2.failed,
            v2.rolled_back,
            v2.running_at_end
        ),
        (hosts, 0, 0, hosts),
        "{}",
        why()
    );
    assert_eq!(report.ended, "all_on_version", "{}", why());
    // The outages were seen (failed checks, refused slot requests) and survived.
    assert!(report.check_errors > 0, "{}", why());
    assert!(report.lock_busy_answers > 0, "{}", why());
    // One install, one reboot slot, one reboot per host (two for a host that went back).
    assert_eq!(count(&report, "installed"), hosts);
    assert_eq!(report.extra_reboots, 0, "{}", why());
    assert!(report.max_lock_holders <= 5, "{}", why());
    let slots = fleet.slot_history().await;
    assert!(slots.max_concurrent <= 5, "{slots:?}");
    assert_eq!(slots.grants.len(), hosts, "{slots:?}");
    assert!(slots.grants.values().all(|&n| n == 1), "{slots:?}");
    assert_eq!(slots.live_at_end, 0, "{slots:?}");
    // The server's record of every host agrees with the simulator: the version it runs, and
    // complete for those on 2.0.0.
    let mut expected: BTreeMap<String, &str> = (0..hosts)
        .map(|i| (simulate::machine_id(&seed, i), "1.0.0"))
        .collect();
    for e in report.timeline.iter().filter(|e| e.event == "booted") {
        expected.insert(simulate::machine_id(&seed, e.host), &e.version);
    }
    let agree = |seen: &BTreeMap<String, Value>| {
        seen.len() == hosts
            && expected.iter().all(|(id, v)| {
                seen.get(id).is_some_and(|i| {
                    i["version"] == *v && (*v != "2.0.0" || i["status"] == "complete")
                })
            })
    };
    fleet
        .wait_instances("the server's records agree with the simulator", agree)
        .await;
}

/// Scenario 3: 2.0.0 fails only on board X (10% of the hosts). A channel-wide automatic halt
/// stops the whole rollout (few X hosts hit, good hosts held); per-board groups halt X only and
/// the other board completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_bad_on_one_board_halts_the_channel_or_only_that_board() {
    // Six simulated hours of ramp in six real seconds.
    let scale = 3600.0;
    let halt = json!({"max_failure_percent": 5, "min_reports": 10});
    let ramp = json!({"kind": "linear", "duration_secs": 6 * 3600});
    let run = |fleet: &Fleet| {
        let mut o = fleet.options(200);
        o.health = vec!["2.0.0:fail=100%,board=X".parse().unwrap()];
        o.boards = vec!["X=10%".parse().unwrap(), "Y=90%".parse().unwrap()];
        o.group_by_board = true;
        o
    };

    // Channel-wide policy: every host counts towards one halt.
    let fleet = Fleet::start(5, scale).await;
    fleet.release("2.0.0").await;
    fleet
        .policy(
            None,
            json!({"start_percent": 10, "ramp": ramp, "halt": halt}),
        )
        .await;
    let wide = simulate::run(run(&fleet)).await.unwrap();
    eprintln!("channel-wide halt:\n{}", wide.render());
    let shown = fleet.rollout("").await;
    assert_eq!(
        (&shown["paused"], &shown["auto_halted"]),
        (&json!(true), &json!(true)),
        "{shown}"
    );
    let x = wide.board_version("X", "2.0.0").unwrap();
    assert!(x.hosts_booted >= 1, "{}", wide.render());
    assert_eq!(
        (x.failed, x.rolled_back, x.running_at_end),
        (x.hosts_booted, x.hosts_booted, 0)
    );
    // Good hosts were held by the halt.
    let y_hosts = wide.boards.iter().find(|b| b.board == "Y").unwrap().hosts;
    let y = wide.board_version("Y", "2.0.0").unwrap();
    assert_eq!(y.failed, 0);
    assert!(y.running_at_end < y_hosts, "{}", wide.render());
    drop(fleet);

    // Per-board groups, each with the same policy: only X halts, Y completes.
    let fleet = Fleet::start(5, scale).await;
    fleet.release("2.0.0").await;
    for g in ["X", "Y"] {
        fleet
            .policy(
                Some(g),
                json!({"start_percent": 10, "ramp": ramp, "halt": halt}),
            )
            .await;
    }
    let per_group = simulate::run(run(&fleet)).await.unwrap();
    eprintln!("per-board halt:\n{}", per_group.render());
    let gx = fleet.rollout("X").await;
    let gy = fleet.rollout("Y").await;
    assert_eq!(
        (&gx["paused"], &gx["auto_halted"]),
        (&json!(true), &json!(true)),
        "{gx}"
    );
    assert_eq!(gy["paused"], false, "{gy}");
    let x = per_group.board_version("X", "2.0.0").unwrap();
    // X halts after its own 10 reports.
    assert!(x.hosts_booted >= 10, "{}", per_group.render());
    assert_eq!(
        (x.failed, x.rolled_back, x.running_at_end),
        (x.hosts_booted, x.hosts_booted, 0)
    );
    let y = per_group.board_version("Y", "2.0.0").unwrap();
    assert_eq!(
        (y.failed, y.running_at_end),
        (0, y_hosts),
        "{}",
        per_group.render()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subcommand_prints_the_summary_writes_the_timeline_and_names_bad_input() {
    let fleet = Fleet::start(3, 2.0).await;
    fleet.release("2.0.0").await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    std::fs::write(&keyring, fleet.keyring.to_bytes()).unwrap();
    let bin = env!("CARGO_BIN_EXE_update-agent");
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(bin)
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

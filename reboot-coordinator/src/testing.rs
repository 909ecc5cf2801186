//! Test support: real etcd members (Debian's `/usr/bin/etcd`) on free loopback ports with temp
//! data dirs. Used by this crate's tests and benchmark; other crates' tests may use it too.
//!
//! Members are killed when the [`EtcdCluster`] is dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the etcd binary (`ETCD_BIN` overrides).
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// A free loopback TCP port (bound then released; etcd needs its ports up front).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One or more etcd members forming one cluster.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts a single-member cluster and waits until it answers.
    pub async fn start_single() -> EtcdCluster {
        Self::start(1).await
    }

    /// Starts an `n`-member cluster and waits until every member answers.
    pub async fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("temp dir for etcd");
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    data_dir: dir.path().join(format!("{name}.etcd")),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("etcd log file");
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "twinroot-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", etcd_binary().display()));
        m.child = Some(child);
    }

    /// Waits (deadline 30 s) until member `i` serves a linearizable read.
    pub async fn wait_ready(&self, i: usize) {
        let endpoint = self.endpoint(i);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = async {
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500))
                    .with_timeout(Duration::from_millis(1000));
                let mut c = etcd_client::Client::connect([endpoint.clone()], Some(opts))
                    .await
                    .ok()?;
                c.get("/twinroot-test-probe", None).await.ok()
            }
            .await
            .is_some();
            if ok {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                panic!("etcd member {i} at {endpoint} not ready after 30 s; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Index of the member that is raft leader now, as seen by the first running member that
    /// answers (polled with a 20 s deadline).
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let Ok(mut c) = etcd_client::Client::connect([self.endpoint(i)], None).await else {
                    continue;
                };
                let Ok(status) = c.status().await else {
                    continue;
                };
                let own = status.header().map(|h| h.member_id());
                if own.is_some() && Some(status.leader()) == own {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader after 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed member on the same ports and data dir, and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Directory holding data dirs and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// What happened to the holder keys of one group, replayed from etcd's own history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HolderHistory {
    /// Largest number of holder keys that existed at any revision.
    pub max_concurrent: usize,
    /// Number of holder-key creations (grants) per id.
    pub grants: std::collections::BTreeMap<String, usize>,
    /// Number of holder-key deletions (releases and expiries).
    pub removals: usize,
    /// Holder keys alive at the end.
    pub live_at_end: usize,
}

/// Replays every revision of the etcd history (from revision 1, no compaction assumed) and tracks
/// the holder keys of `group` under `prefix`: the authoritative order in which grants and removals
/// took effect, whatever the clients saw.
pub async fn holder_history(endpoint: &str, prefix: &str, group: &str) -> HolderHistory {
    use etcd_client::{EventType, WatchOptions};
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("connect etcd for history");
    let head = c
        .get("/", Some(etcd_client::GetOptions::new().with_count_only()))
        .await
        .expect("read etcd revision")
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    let holders_prefix = format!("{prefix}groups/{group}/holders/");
    let mut live: std::collections::BTreeSet<String> = Default::default();
    let mut history = HolderHistory::default();
    if head <= 1 {
        return history;
    }
    let mut stream = c
        .watch(
            "",
            Some(WatchOptions::new().with_all_keys().with_start_revision(1)),
        )
        .await
        .expect("watch etcd history");
    let mut last_rev = 0;
    while last_rev < head {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("history watch timed out")
            .expect("history watch failed")
            .expect("history watch ended early");
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.mod_revision() != last_rev {
                history.max_concurrent = history.max_concurrent.max(live.len());
                last_rev = kv.mod_revision();
            }
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(id) = key.strip_prefix(&holders_prefix) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => {
                    if live.insert(id.to_string()) {
                        *history.grants.entry(id.to_string()).or_default() += 1;
                    }
                }
                EventType::Delete => {
                    if live.remove(id) {
                        history.removals += 1;
                    }
                }
            }
        }
    }
    history.max_concurrent = history.max_concurrent.max(live.len());
    history.live_at_end = live.len();
    history
}

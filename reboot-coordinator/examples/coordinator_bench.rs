//! Benchmark: acquire+release round trips through the FleetLock HTTP server versus raw etcd
//! put+delete round trips, against the same local single-member etcd, in the same run.
//! Run through `bench/coordinator.sh`, which writes the table into docs/BENCHMARKS.md.
//!
//! Usage: coordinator_bench [SECONDS_PER_CASE] [CONCURRENCY,...]

use reboot_coordinator::etcd_store::{EtcdConfig, EtcdStore};
use reboot_coordinator::metrics::Metrics;
use reboot_coordinator::semaphore::{Semaphore, SemaphoreConfig};
use reboot_coordinator::server::{Coordinator, ServerConfig};
use reboot_coordinator::testing::EtcdCluster;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use twinroot_format::fleetlock::Request;

struct CaseResult {
    round_trips: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl CaseResult {
    fn per_second(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i].as_secs_f64() * 1000.0
    }
}

/// Runs `op` in `concurrency` workers for `duration` (after a short warm-up per worker).
async fn run_case<F, Fut>(concurrency: usize, duration: Duration, op: F) -> CaseResult
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    // Warm-up: a few rounds per worker, not measured.
    for w in 0..concurrency {
        for i in 0..3 {
            op(w, i).await;
        }
    }
    let start = Instant::now();
    let end = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < end {
                    let t = Instant::now();
                    op(w, i).await;
                    lat.push(t.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    CaseResult {
        round_trips: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(5);
    let concurrencies: Vec<usize> = args
        .get(2)
        .map(|s| s.split(',').map(|c| c.parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1, 16]);
    let duration = Duration::from_secs(seconds);

    // Client side: its own runtime. Server side: its own runtime on its own threads.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let etcd = client_rt.block_on(EtcdCluster::start_single());
    let endpoints = etcd.endpoints();
    let max_c = *concurrencies.iter().max().unwrap();

    let cancel = CancellationToken::new();
    let url = server_rt.block_on(async {
        let store = EtcdStore::connect(EtcdConfig::new(endpoints.clone()))
            .await
            .unwrap();
        store.set_slots("bench", max_c as u32).await.unwrap();
        let coordinator = Arc::new(Coordinator {
            semaphore: Semaphore::new(
                store,
                SemaphoreConfig {
                    default_slots: 1,
                    lease_seconds: 60,
                    max_attempts: 64,
                },
            ),
            config: ServerConfig::default(),
            metrics: Metrics::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(reboot_coordinator::server::run(
            listener,
            coordinator.clone(),
            cancel.clone(),
        ));
        (url, coordinator)
    });
    let (url, coordinator) = url;

    let rows: Vec<(String, usize, CaseResult)> = client_rt.block_on(async {
        let mut rows = Vec::new();
        let etcd_client = etcd_client::Client::connect(&endpoints, None)
            .await
            .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().build().unwrap();
        for &c in &concurrencies {
            let kv = etcd_client.clone();
            let raw = run_case(c, duration, move |w, i| {
                let mut kv = kv.clone();
                async move {
                    let key = format!("/bench/raw/{w}");
                    kv.put(key.clone(), format!("{i}"), None).await.unwrap();
                    kv.delete(key, None).await.unwrap();
                }
            })
            .await;
            rows.push(("raw etcd put+delete".to_string(), c, raw));

            let (h, u) = (http.clone(), url.clone());
            let fleetlock = run_case(c, duration, move |w, _| {
                let (h, u) = (h.clone(), u.clone());
                async move {
                    let body = Request::new(format!("bench-{w}"), "bench");
                    for path in ["/v1/pre-reboot", "/v1/steady-state"] {
                        let r = h
                            .post(format!("{u}{path}"))
                            .header("fleet-lock-protocol", "true")
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
                    }
                }
            })
            .await;
            rows.push(("FleetLock HTTP acquire+release".to_string(), c, fleetlock));
        }
        rows
    });
    cancel.cancel();

    println!("| case | concurrency | round trips/s | p50 ms | p99 ms | vs raw etcd |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, c, r) in &rows {
        let raw = rows
            .iter()
            .find(|(n, rc, _)| n.starts_with("raw") && rc == c)
            .map(|(_, _, r)| r.per_second())
            .unwrap();
        println!(
            "| {name} | {c} | {:.0} | {:.2} | {:.2} | {:.2}x |",
            r.per_second(),
            r.percentile_ms(0.50),
            r.percentile_ms(0.99),
            r.per_second() / raw
        );
    }
    println!();
    println!(
        "Grant conflicts (acquire attempts restarted because another grant took the chosen slot): \
         {} over {} grants.",
        coordinator.semaphore.conflicts(),
        coordinator
            .metrics
            .grants
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(etcd);
}

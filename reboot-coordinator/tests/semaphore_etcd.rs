//! The semaphore library against a real etcd.

use reboot_coordinator::etcd_store::{DEFAULT_PREFIX, EtcdConfig, EtcdStore};
use reboot_coordinator::semaphore::{
    AcquireError, Acquired, Refusal, Semaphore, SemaphoreConfig, SlotStore, StoreError,
};
use reboot_coordinator::testing::{EtcdCluster, holder_history};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

async fn semaphore(endpoints: Vec<String>, lease_seconds: u64) -> Semaphore<EtcdStore> {
    let mut config = EtcdConfig::new(endpoints);
    config.timeout = Duration::from_secs(5);
    let store = EtcdStore::connect(config).await.unwrap();
    Semaphore::new(
        store,
        SemaphoreConfig {
            default_slots: 1,
            lease_seconds,
            max_attempts: 64,
        },
    )
}

fn refused_no_slot(r: Result<Acquired, AcquireError>) -> bool {
    matches!(r, Err(AcquireError::Refused(Refusal::NoSlot { .. })))
}

#[tokio::test]
async fn grant_refuse_reenter_release() {
    let etcd = EtcdCluster::start_single().await;
    let s = semaphore(etcd.endpoints(), 60).await;
    s.store().set_slots("g", 2).await.unwrap();

    assert_eq!(s.acquire("g", "a", true).await, Ok(Acquired::Granted));
    assert_eq!(s.acquire("g", "b", true).await, Ok(Acquired::Granted));
    let r = s.acquire("g", "c", true).await;
    assert_eq!(
        r,
        Err(AcquireError::Refused(Refusal::NoSlot {
            group: "g".into(),
            slots: 2,
            held: 2
        }))
    );
    // Re-entrant, also when the window is closed.
    assert_eq!(s.acquire("g", "a", true).await, Ok(Acquired::Renewed));
    assert_eq!(s.acquire("g", "a", false).await, Ok(Acquired::Renewed));
    // Window closed: no new grant even with a free slot.
    assert!(s.release("g", "b").await.unwrap());
    assert!(matches!(
        s.acquire("g", "c", false).await,
        Err(AcquireError::Refused(Refusal::NewGrantsClosed { .. }))
    ));
    // Idempotent release.
    assert!(!s.release("g", "b").await.unwrap());
    // A renewal based on a snapshot taken before a release does not resurrect the slot.
    assert_eq!(s.acquire("g", "b2", true).await, Ok(Acquired::Granted));
    let before = s.store().read_group("g").await.unwrap();
    let stale = before.holder("b2").unwrap().clone();
    assert!(s.release("g", "b2").await.unwrap());
    assert!(!s.store().renew("g", &stale).await.unwrap());
    // The same once the release has revoked the stale lease (done in the background): a lease
    // that is gone means "no longer held", not a store error.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.store().lease_ttl(stale.lease).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "lease {:x} never revoked",
            stale.lease
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(s.store().renew("g", &stale).await, Ok(false));
    assert_eq!(s.acquire("g", "c", true).await, Ok(Acquired::Granted));
    // Groups are independent; unconfigured groups use the default (1).
    assert_eq!(s.acquire("other", "a", true).await, Ok(Acquired::Granted));
    assert!(refused_no_slot(s.acquire("other", "b", true).await));

    let groups = s.store().groups().await.unwrap();
    let g = groups.iter().find(|g| g.group == "g").unwrap();
    assert_eq!(g.slots, Some(2));
    let mut ids: Vec<_> = g.holders.iter().map(|h| h.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "c"]);
    let activity = s.store().activity(100).await.unwrap();
    let events: Vec<String> = activity
        .iter()
        .filter(|e| e.group == "g")
        .map(|e| format!("{} {}", e.event, e.id))
        .collect();
    assert_eq!(
        events,
        [
            "set-slots -",
            "granted a",
            "granted b",
            "released b",
            "granted b2",
            "released b2",
            "granted c"
        ]
    );
    // Retention: entries older than the cutoff go, newer ones stay.
    let cutoff = activity[3].at_unix_ms;
    let older = activity.iter().filter(|e| e.at_unix_ms < cutoff).count() as i64;
    assert_eq!(s.store().trim_activity(cutoff).await.unwrap(), older);
    let left = s.store().activity(100).await.unwrap();
    assert!(left.iter().all(|e| e.at_unix_ms >= cutoff));
    assert_eq!(left.len(), activity.len() - older as usize);
}

#[tokio::test]
async fn slot_count_changes_at_run_time_without_evicting() {
    let etcd = EtcdCluster::start_single().await;
    let s = semaphore(etcd.endpoints(), 60).await;
    s.store().set_slots("g", 3).await.unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(s.acquire("g", id, true).await, Ok(Acquired::Granted));
    }
    s.store().set_slots("g", 1).await.unwrap();
    // Nobody is evicted: all three still hold and renew.
    for id in ["a", "b", "c"] {
        assert_eq!(s.acquire("g", id, true).await, Ok(Acquired::Renewed));
    }
    assert!(refused_no_slot(s.acquire("g", "d", true).await));
    assert!(s.release("g", "a").await.unwrap());
    assert!(s.release("g", "b").await.unwrap());
    assert!(refused_no_slot(s.acquire("g", "d", true).await));
    assert!(s.release("g", "c").await.unwrap());
    assert_eq!(s.acquire("g", "d", true).await, Ok(Acquired::Granted));
    s.store().set_slots("g", 2).await.unwrap();
    assert_eq!(s.acquire("g", "e", true).await, Ok(Acquired::Granted));
    // seed_slots keeps an existing count.
    assert_eq!(s.store().seed_slots("g", 7).await.unwrap(), 2);
    assert_eq!(s.store().seed_slots("fresh", 7).await.unwrap(), 7);
}

#[tokio::test]
async fn two_coordinators_racing_never_over_grant() {
    let etcd = EtcdCluster::start_single().await;
    let s1 = Arc::new(semaphore(etcd.endpoints(), 60).await);
    let s2 = Arc::new(semaphore(etcd.endpoints(), 60).await);
    s1.store().set_slots("race", 3).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { s1.clone() } else { s2.clone() };
        tasks.push(tokio::spawn(async move {
            let id = format!("host-{i}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match s.acquire("race", &id, true).await {
                    Ok(Acquired::Granted) => break,
                    Ok(Acquired::Renewed) => panic!("{id} renewed a slot it never got"),
                    Err(AcquireError::Refused(_)) | Err(AcquireError::Contention { .. }) => {
                        assert!(Instant::now() < deadline, "{id} never got a slot");
                        tokio::time::sleep(Duration::from_millis(5 + (i % 7) as u64)).await;
                    }
                    Err(e) => panic!("{id}: {e}"),
                }
            }
            tokio::task::yield_now().await;
            assert!(s.release("race", &id).await.unwrap());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = holder_history(&etcd.endpoint(0), DEFAULT_PREFIX, "race").await;
    assert!(h.max_concurrent <= 3, "{h:?}");
    assert_eq!(h.grants.len(), 40);
    assert!(h.grants.values().all(|n| *n == 1), "{h:?}");
    assert_eq!(h.live_at_end, 0);
}

#[tokio::test]
async fn dead_holder_expires_and_live_holder_keeps_its_slot() {
    let etcd = EtcdCluster::start_single().await;
    let s = Arc::new(semaphore(etcd.endpoints(), 4).await);
    let expiries = Arc::new(AtomicU64::new(0));
    let cancel = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let s = s.clone();
        let expiries = expiries.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            s.store()
                .watch_expiries(cancel, move |_, _| {
                    expiries.fetch_add(1, Ordering::Relaxed);
                })
                .await
        })
    };
    s.store().set_slots("g", 2).await.unwrap();
    assert_eq!(s.acquire("g", "dies", true).await, Ok(Acquired::Granted));
    assert_eq!(s.acquire("g", "lives", true).await, Ok(Acquired::Granted));
    assert!(refused_no_slot(s.acquire("g", "waits", true).await));

    // "lives" keeps reporting progress (repeated pre-reboot) every 500 ms; "dies" goes silent.
    // Poll until "waits" gets the freed slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(s.acquire("g", "lives", true).await, Ok(Acquired::Renewed));
        match s.acquire("g", "waits", true).await {
            Ok(Acquired::Granted) => break,
            r => assert!(refused_no_slot(r)),
        }
        assert!(
            Instant::now() < deadline,
            "the dead holder's slot never expired"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The live holder still holds; the dead one is gone.
    let groups = s.store().groups().await.unwrap();
    let mut ids: Vec<_> = groups[0].holders.iter().map(|h| h.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["lives", "waits"]);
    // The expiry is in the activity log and was counted (by the watcher).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let activity = s.store().activity(100).await.unwrap();
        let expired: Vec<_> = activity.iter().filter(|e| e.event == "expired").collect();
        if !expired.is_empty() {
            assert_eq!(expired.len(), 1);
            assert_eq!(expired[0].id, "dies");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expiry never logged: {activity:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(expiries.load(Ordering::Relaxed), 1);
    // A normal release is not an expiry.
    assert!(s.release("g", "lives").await.unwrap());
    let lease_probe = s.acquire("g", "probe", true).await;
    assert_eq!(lease_probe, Ok(Acquired::Granted));
    assert_eq!(expiries.load(Ordering::Relaxed), 1);
    cancel.cancel();
    watcher.await.unwrap();
}

#[tokio::test]
async fn etcd_down_fails_closed_and_recovers() {
    let mut etcd = EtcdCluster::start_single().await;
    let s = semaphore(etcd.endpoints(), 60).await;
    assert_eq!(s.acquire("g", "a", true).await, Ok(Acquired::Granted));
    etcd.kill(0);
    match s.acquire("g", "b", true).await {
        Err(AcquireError::Store(StoreError::Unavailable { endpoints, .. })) => {
            assert_eq!(endpoints, etcd.endpoint(0))
        }
        other => panic!("expected etcd unavailable, got {other:?}"),
    }
    assert!(matches!(
        s.release("g", "a").await,
        Err(StoreError::Unavailable { .. })
    ));
    etcd.restart(0).await;
    // The same client recovers without being rebuilt.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match s.store().read_group("g").await {
            Ok(snapshot) => {
                assert_eq!(snapshot.holders.len(), 1);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused_no_slot(s.acquire("g", "b", true).await));
    assert!(s.release("g", "a").await.unwrap());
    assert_eq!(s.acquire("g", "b", true).await, Ok(Acquired::Granted));
}

#[tokio::test]
async fn holder_above_a_lowered_count_blocks_grants() {
    let etcd = EtcdCluster::start_single().await;
    let s = semaphore(etcd.endpoints(), 60).await;
    s.store().set_slots("g", 3).await.unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(s.acquire("g", id, true).await, Ok(Acquired::Granted));
    }
    let groups = s.store().groups().await.unwrap();
    let mut slots: Vec<u32> = groups[0].holders.iter().map(|h| h.slot).collect();
    slots.sort();
    assert_eq!(
        slots,
        [0, 1, 2],
        "three holders occupy three distinct slots"
    );
    let top = groups[0]
        .holders
        .iter()
        .find(|h| h.slot == 2)
        .unwrap()
        .id
        .clone();
    s.store().set_slots("g", 2).await.unwrap();
    for h in &groups[0].holders {
        if h.id != top {
            assert!(s.release("g", &h.id).await.unwrap());
        }
    }
    // One holder for two slots, but it sits in slot 2: granting now could reach three holders.
    assert!(matches!(
        s.acquire("g", "d", true).await,
        Err(AcquireError::Refused(Refusal::Lowered {
            slot: 2,
            slots: 2,
            ..
        }))
    ));
    assert!(s.release("g", &top).await.unwrap());
    assert_eq!(s.acquire("g", "d", true).await, Ok(Acquired::Granted));
    assert_eq!(s.acquire("g", "e", true).await, Ok(Acquired::Granted));
    assert!(refused_no_slot(s.acquire("g", "f", true).await));
    assert!(matches!(
        s.store().set_slots("g", 10_001).await,
        Err(StoreError::Invalid(_))
    ));
}

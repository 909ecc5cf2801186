//! [`SlotStore`] on etcd v3.
//!
//! Key layout under a prefix (default `/twinroot/reboot/`):
//! - `groups/<group>/config`        `{"slots":N}` (absent: the coordinator's default slot count)
//! - `groups/<group>/slots/<nnnnn>` the id holding slot number n (zero-padded to 5 digits)
//! - `groups/<group>/holders/<id>`  `{"id","slot","acquired_unix_ms","lease_seconds"}`
//!
//! A holder's slot key and holder key are written in one transaction, attached to the same etcd
//! lease of `lease_seconds`, and deleted together (release transaction or lease expiry). A grant
//! transaction requires: its slot key absent, no slot key numbered at or above the slot count
//! (a range compare), the config key unchanged since the read, and the holder key absent.
//! - `activity/<unix_ms>-<event>-<group>-<id>`  activity log entries (granted, released, expired,
//!   set-slots), `{"at_unix_ms","event","group","id","detail"}`
//! - `expiry-marks/<revision>-<group>-<id>`  dedupes expiry log entries between coordinators
//!   (attached to a one-hour lease)

use crate::semaphore::{GrantRequest, GroupSnapshot, Holder, MAX_SLOTS, SlotStore, StoreError};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/twinroot/reboot/";

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Deadline of every single etcd call; past it the call counts as "etcd unavailable".
    pub timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            timeout: Duration::from_secs(3),
        }
    }
}

/// Value of a holder key (wire format inside etcd).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HolderValue {
    id: String,
    slot: u32,
    acquired_unix_ms: u64,
    lease_seconds: u64,
}

/// Value of a group config key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupConfigValue {
    slots: u32,
}

/// One activity log entry (wire format inside etcd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityEntry {
    pub at_unix_ms: u64,
    /// `granted`, `released`, `expired` or `set-slots`.
    pub event: String,
    pub group: String,
    pub id: String,
    pub detail: String,
}

/// Holder as shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderStatus {
    pub holder: Holder,
    /// Seconds until the lease expires (None if it could not be read).
    pub ttl_seconds: Option<i64>,
}

/// Group as shown by `status` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: String,
    pub slots: Option<u32>,
    pub holders: Vec<Holder>,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The etcd-backed store.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
    endpoints_text: String,
}

impl EtcdStore {
    /// Creates the client. The connection is lazy: this succeeds while etcd is down, and every
    /// call made then fails with [`StoreError::Unavailable`].
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        let endpoints_text = config.endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = tokio::time::timeout(
            config.timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await
        .map_err(|_| StoreError::Unavailable {
            endpoints: endpoints_text.clone(),
            reason: "connect timed out".into(),
        })?
        .map_err(|e| classify(&endpoints_text, e))?;
        Ok(EtcdStore {
            client,
            config,
            endpoints_text,
        })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn group_prefix(&self, group: &str) -> String {
        format!("{}groups/{group}/", self.config.prefix)
    }
    fn config_key(&self, group: &str) -> String {
        format!("{}config", self.group_prefix(group))
    }
    fn slot_key(&self, group: &str, slot: u32) -> String {
        format!("{}slots/{slot:05}", self.group_prefix(group))
    }
    /// End (exclusive) of the range holding all slot keys of a group.
    fn slots_end(&self, group: &str) -> String {
        format!("{}slots0", self.group_prefix(group))
    }
    fn holder_key(&self, group: &str, id: &str) -> String {
        format!("{}holders/{id}", self.group_prefix(group))
    }
    fn activity_prefix(&self) -> String {
        format!("{}activity/", self.config.prefix)
    }
    fn activity_key(&self, e: &ActivityEntry) -> String {
        format!(
            "{}{:013}-{}-{}-{}",
            self.activity_prefix(),
            e.at_unix_ms,
            e.event,
            e.group,
            e.id
        )
    }

    /// Runs one etcd call under the deadline, mapping errors.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.within_deadline(f)
            .await?
            .map_err(|e| classify(&self.endpoints_text, e))
    }

    /// Runs one etcd call under the deadline; etcd's own error is left to the caller.
    async fn within_deadline<T, F>(&self, f: F) -> Result<Result<T, etcd_client::Error>, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.config.timeout, f)
            .await
            .map_err(|_| StoreError::Unavailable {
                endpoints: self.endpoints_text.clone(),
                reason: format!("no answer within {:?}", self.config.timeout),
            })
    }

    /// Revokes a lease without waiting (cleanup only: an unused lease also expires by itself).
    fn revoke_in_background(&self, lease: i64) {
        let mut c = self.client.clone();
        let timeout = self.config.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, c.lease_revoke(lease)).await;
        });
    }

    /// Sets the slot count of a group (recorded in the activity log).
    pub async fn set_slots(&self, group: &str, slots: u32) -> Result<(), StoreError> {
        check_slot_count(group, slots)?;
        let value = serde_json::to_string(&GroupConfigValue { slots }).expect("serializable");
        let entry = ActivityEntry {
            at_unix_ms: now_unix_ms(),
            event: "set-slots".into(),
            group: group.into(),
            id: "-".into(),
            detail: format!("slots={slots}"),
        };
        let txn = Txn::new().and_then([
            TxnOp::put(self.config_key(group), value, None),
            TxnOp::put(
                self.activity_key(&entry),
                serde_json::to_string(&entry).expect("serializable"),
                None,
            ),
        ]);
        let mut c = self.client.clone();
        self.call(c.txn(txn)).await?;
        Ok(())
    }

    /// Writes the slot count only if the group has none yet; returns the count in force.
    pub async fn seed_slots(&self, group: &str, slots: u32) -> Result<u32, StoreError> {
        check_slot_count(group, slots)?;
        let key = self.config_key(group);
        let value = serde_json::to_string(&GroupConfigValue { slots }).expect("serializable");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let resp = self.call(c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(slots);
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                return parse_config(&key, kv.value());
            }
        }
        Ok(slots)
    }

    /// Every group that has a config or holders.
    pub async fn groups(&self) -> Result<Vec<GroupStatus>, StoreError> {
        let prefix = format!("{}groups/", self.config.prefix);
        let mut c = self.client.clone();
        let resp = self
            .call(c.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut groups: BTreeMap<String, GroupStatus> = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let Some((group, tail)) = rest.split_once('/') else {
                continue;
            };
            let entry = groups
                .entry(group.to_string())
                .or_insert_with(|| GroupStatus {
                    group: group.to_string(),
                    slots: None,
                    holders: vec![],
                });
            if tail == "config" {
                entry.slots = Some(parse_config(&key, kv.value())?);
            } else if tail.starts_with("holders/") {
                entry
                    .holders
                    .push(parse_holder(&key, kv.value(), kv.lease())?);
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Seconds left on a lease (`None` if it no longer exists).
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<i64>, StoreError> {
        let mut c = self.client.clone();
        let resp = self.call(c.lease_time_to_live(lease, None)).await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    /// The newest `limit` activity log entries, oldest first.
    pub async fn activity(&self, limit: usize) -> Result<Vec<ActivityEntry>, StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .call(
                c.get(
                    self.activity_prefix(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(
                                etcd_client::SortTarget::Key,
                                etcd_client::SortOrder::Descend,
                            )
                            .with_limit(limit as i64),
                    ),
                ),
            )
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let e: ActivityEntry =
                serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                    key,
                    reason: e.to_string(),
                })?;
            out.push(e);
        }
        out.reverse();
        Ok(out)
    }

    /// Deletes activity log entries older than `cutoff_unix_ms` (keys are time-ordered, so this is
    /// one range delete); returns how many went.
    pub async fn trim_activity(&self, cutoff_unix_ms: u64) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let start = self.activity_prefix();
        let end = format!("{}{cutoff_unix_ms:013}", self.activity_prefix());
        let resp = self
            .call(c.delete(start, Some(DeleteOptions::new().with_range(end))))
            .await?;
        Ok(resp.deleted())
    }

    /// Current etcd revision (a cheap health probe).
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .call(c.get(
                format!("{}probe", self.config.prefix),
                Some(GetOptions::new().with_count_only()),
            ))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Watches holder deletions and records those that were not releases as expiries (activity log
    /// entry written once across all coordinators; `on_expiry` called in every coordinator that
    /// sees it). Returns when `cancel` fires; reconnects after etcd errors.
    pub async fn watch_expiries(
        &self,
        cancel: tokio_util::sync::CancellationToken,
        on_expiry: impl Fn(&str, &str) + Send + Sync,
    ) {
        let mut start_revision = 0i64;
        let mut backoff = Duration::from_millis(250);
        loop {
            let before = start_revision;
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.watch_expiries_once(&mut start_revision, &on_expiry) => r,
            };
            if start_revision != before {
                backoff = Duration::from_millis(250);
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, retry_in = ?backoff, "expiry watch interrupted");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn watch_expiries_once(
        &self,
        start_revision: &mut i64,
        on_expiry: &(impl Fn(&str, &str) + Send + Sync),
    ) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        if *start_revision == 0 {
            *start_revision = self.revision().await? + 1;
        }
        let mut options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*start_revision);
        options = options.with_progress_notify();
        let mut stream = self
            .call(c.watch(self.config.prefix.clone(), Some(options)))
            .await?;
        let groups_prefix = format!("{}groups/", self.config.prefix);
        let activity_prefix = self.activity_prefix();
        loop {
            let msg = stream
                .message()
                .await
                .map_err(|e| classify(&self.endpoints_text, e))?;
            let Some(resp) = msg else {
                return Err(StoreError::Unavailable {
                    endpoints: self.endpoints_text.clone(),
                    reason: "watch stream closed".into(),
                });
            };
            if resp.canceled() {
                return Err(StoreError::Failed {
                    endpoints: self.endpoints_text.clone(),
                    reason: format!("watch canceled: {}", resp.cancel_reason()),
                });
            }
            // Releases delete the holder and write a `released` entry in one transaction, so both
            // events arrive in the same response (etcd never splits a revision's events).
            let mut released: HashSet<(i64, String, String)> = HashSet::new();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                if ev.event_type() == EventType::Put
                    && kv.key().starts_with(activity_prefix.as_bytes())
                    && let Ok(entry) = serde_json::from_slice::<ActivityEntry>(kv.value())
                    && entry.event == "released"
                {
                    released.insert((kv.mod_revision(), entry.group, entry.id));
                }
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                *start_revision = (*start_revision).max(kv.mod_revision() + 1);
                if ev.event_type() != EventType::Delete {
                    continue;
                }
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some(rest) = key.strip_prefix(&groups_prefix) else {
                    continue;
                };
                let Some((group, id)) = rest.split_once("/holders/") else {
                    continue;
                };
                if released.contains(&(kv.mod_revision(), group.to_string(), id.to_string())) {
                    continue;
                }
                on_expiry(group, id);
                tracing::info!(group, id, "reboot slot expired");
                self.record_expiry(kv.mod_revision(), group, id).await?;
            }
        }
    }

    async fn record_expiry(&self, revision: i64, group: &str, id: &str) -> Result<(), StoreError> {
        let mark = format!(
            "{}expiry-marks/{revision:016}-{group}-{id}",
            self.config.prefix
        );
        let mut c = self.client.clone();
        let lease = self.call(c.lease_grant(3600, None)).await?.id();
        let entry = ActivityEntry {
            at_unix_ms: now_unix_ms(),
            event: "expired".into(),
            group: group.into(),
            id: id.into(),
            detail: format!("holder lease expired (etcd revision {revision})"),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(mark.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(mark, "", Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(
                    self.activity_key(&entry),
                    serde_json::to_string(&entry).expect("serializable"),
                    None,
                ),
            ]);
        let resp = self.call(c.txn(txn)).await?;
        if !resp.succeeded() {
            let _ = self.call(c.lease_revoke(lease)).await;
        }
        Ok(())
    }
}

fn check_slot_count(group: &str, slots: u32) -> Result<(), StoreError> {
    if slots > MAX_SLOTS {
        return Err(StoreError::Invalid(format!(
            "group {group}: slot count {slots} is above the maximum {MAX_SLOTS}"
        )));
    }
    Ok(())
}

fn parse_config(key: &str, value: &[u8]) -> Result<u32, StoreError> {
    serde_json::from_slice::<GroupConfigValue>(value)
        .map(|c| c.slots)
        .map_err(|e| StoreError::Corrupt {
            key: key.to_string(),
            reason: format!("expected {{\"slots\":N}}: {e}"),
        })
}

fn parse_holder(key: &str, value: &[u8], lease: i64) -> Result<Holder, StoreError> {
    let v: HolderValue = serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: format!("expected a holder record: {e}"),
    })?;
    Ok(Holder {
        id: v.id,
        slot: v.slot,
        acquired_unix_ms: v.acquired_unix_ms,
        lease,
    })
}

/// Connection trouble is "unavailable"; anything etcd answered is a plain failure.
fn classify(endpoints: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let unavailable = match &e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        _ => false,
    };
    if unavailable {
        StoreError::Unavailable {
            endpoints: endpoints.to_string(),
            reason: e.to_string(),
        }
    } else {
        StoreError::Failed {
            endpoints: endpoints.to_string(),
            reason: e.to_string(),
        }
    }
}

impl SlotStore for EtcdStore {
    async fn read_group(&self, group: &str) -> Result<GroupSnapshot, StoreError> {
        let prefix = self.group_prefix(group);
        let mut c = self.client.clone();
        let resp = self
            .call(c.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut snapshot = GroupSnapshot {
            group: group.to_string(),
            ..Default::default()
        };
        let config_key = self.config_key(group);
        let holders_prefix = format!("{prefix}holders/");
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == config_key {
                snapshot.slots = Some(parse_config(&key, kv.value())?);
                snapshot.guard.config_revision = kv.mod_revision();
            } else if key.starts_with(&holders_prefix) {
                snapshot
                    .holders
                    .push(parse_holder(&key, kv.value(), kv.lease())?);
            }
        }
        Ok(snapshot)
    }

    async fn try_grant(&self, grant: GrantRequest<'_>) -> Result<bool, StoreError> {
        let GrantRequest {
            group,
            id,
            slot,
            slots,
            guard,
            lease_seconds,
        } = grant;
        let mut c = self.client.clone();
        let lease = self
            .call(c.lease_grant(lease_seconds as i64, None))
            .await?
            .id();
        let now = now_unix_ms();
        let holder = HolderValue {
            id: id.to_string(),
            slot,
            acquired_unix_ms: now,
            lease_seconds,
        };
        let entry = ActivityEntry {
            at_unix_ms: now,
            event: "granted".into(),
            group: group.into(),
            id: id.into(),
            detail: format!("pre-reboot: slot {slot}, lease {lease:x} for {lease_seconds}s"),
        };
        let holder_key = self.holder_key(group, id);
        let slot_key = self.slot_key(group, slot);
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([
                Compare::create_revision(slot_key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(self.slot_key(group, slots), CompareOp::Equal, 0)
                    .with_range(self.slots_end(group)),
                Compare::mod_revision(
                    self.config_key(group),
                    CompareOp::Equal,
                    guard.config_revision,
                ),
                Compare::create_revision(holder_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(slot_key, id, with_lease()),
                TxnOp::put(
                    holder_key,
                    serde_json::to_string(&holder).expect("serializable"),
                    with_lease(),
                ),
                TxnOp::put(
                    self.activity_key(&entry),
                    serde_json::to_string(&entry).expect("serializable"),
                    None,
                ),
            ]);
        // Revoke the unused lease only when etcd answered "not granted". After an error the
        // transaction may still have committed (answer lost); revoking would then silently take
        // the slot away from a host that will retry and find it held. The lease expires anyway.
        let granted = self.call(c.txn(txn)).await?.succeeded();
        if !granted {
            self.revoke_in_background(lease);
        }
        Ok(granted)
    }

    async fn renew(&self, group: &str, holder: &Holder) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        // Opening the keep-alive stream sends one keep-alive and reads its answer: that is the
        // renewal. The client reports a lease that is gone (expired, or revoked after a release)
        // as an error of its own; for us it means "no longer held", not a store failure.
        let lease_gone = |e: &etcd_client::Error| matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found");
        match self
            .within_deadline(c.lease_keep_alive(holder.lease))
            .await?
        {
            Ok(_) => {}
            Err(e) if lease_gone(&e) => return Ok(false),
            Err(e) => return Err(classify(&self.endpoints_text, e)),
        }
        // The lease lives on briefly after a release (it is revoked afterwards): only a holder
        // key still on this lease means the slot is still held.
        let key = self.holder_key(group, &holder.id);
        let resp = self.call(c.get(key, None)).await?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == holder.lease))
    }

    async fn release(&self, group: &str, id: &str, reason: &str) -> Result<bool, StoreError> {
        let holder_key = self.holder_key(group, id);
        let mut c = self.client.clone();
        // Read the holder (for its slot number), then delete holder and slot key together if the
        // holder is still the same grant. Retried if it was re-granted in between.
        for _ in 0..16 {
            let resp = self.call(c.get(holder_key.clone(), None)).await?;
            let Some(kv) = resp.kvs().first() else {
                return Ok(false);
            };
            let holder = parse_holder(&holder_key, kv.value(), kv.lease())?;
            let entry = ActivityEntry {
                at_unix_ms: now_unix_ms(),
                event: "released".into(),
                group: group.into(),
                id: id.into(),
                detail: reason.to_string(),
            };
            let txn = Txn::new()
                .when([Compare::create_revision(
                    holder_key.clone(),
                    CompareOp::Equal,
                    kv.create_revision(),
                )])
                .and_then([
                    TxnOp::delete(holder_key.clone(), None),
                    TxnOp::delete(self.slot_key(group, holder.slot), None),
                    TxnOp::put(
                        self.activity_key(&entry),
                        serde_json::to_string(&entry).expect("serializable"),
                        None,
                    ),
                ]);
            if self.call(c.txn(txn)).await?.succeeded() {
                if holder.lease != 0 {
                    self.revoke_in_background(holder.lease);
                }
                return Ok(true);
            }
        }
        Err(StoreError::Failed {
            endpoints: self.endpoints_text.clone(),
            reason: format!("group {group}: holder {id} kept changing during release"),
        })
    }
}

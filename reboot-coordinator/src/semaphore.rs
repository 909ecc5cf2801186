//! The reboot semaphore: which host may reboot now.
//!
//! The arithmetic ([`decide`]) is a pure function over a [`GroupSnapshot`]; the storage comes in
//! through [`SlotStore`] (etcd in production, see `etcd_store`). [`Semaphore`] runs the
//! read-decide-write loop. Every holder occupies one numbered slot `0..N`; a grant claims a free
//! slot number and is only written if that slot is still free, no slot numbered `N` or above is
//! held, and the slot count did not change since the read. Two grants that pick different free
//! slots do not conflict, and any number of coordinators sharing one store never grant more than
//! N between them.

use std::future::Future;

/// One host holding a reboot slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Node id from the FleetLock request.
    pub id: String,
    /// When the slot was granted (unix milliseconds, coordinator clock).
    pub acquired_unix_ms: u64,
    /// Slot number `0..N` this holder occupies.
    pub slot: u32,
    /// Store handle of the expiry (etcd lease id).
    pub lease: i64,
}

/// Version stamp of the group config; a changed slot count invalidates a decision to grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Guard {
    /// Modification revision of the group's config key (0 = absent).
    pub config_revision: i64,
}

/// Everything the semaphore knows about one group, read at one point in time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupSnapshot {
    pub group: String,
    /// Configured slot count; `None` when the group has no config yet (the default applies).
    pub slots: Option<u32>,
    pub holders: Vec<Holder>,
    pub guard: Guard,
}

impl GroupSnapshot {
    pub fn holder(&self, id: &str) -> Option<&Holder> {
        self.holders.iter().find(|h| h.id == id)
    }
}

/// Why a slot was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// All slots are taken.
    NoSlot {
        group: String,
        slots: u32,
        held: usize,
    },
    /// A host still holds a slot numbered at or above a lowered slot count.
    Lowered {
        group: String,
        slots: u32,
        slot: u32,
    },
    /// The caller said no new grants may be made now (reboot window closed).
    NewGrantsClosed { group: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoSlot { group, slots, held } => write!(
                f,
                "group {group}: {held} of {slots} reboot slots are taken, retry later"
            ),
            Refusal::Lowered { group, slots, slot } => write!(
                f,
                "group {group}: slot {slot} is still held since the slot count was lowered to \
                 {slots}, retry later"
            ),
            Refusal::NewGrantsClosed { group } => {
                write!(f, "group {group}: the reboot window is closed, retry later")
            }
        }
    }
}

/// What to do with an acquire request, given a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The id already holds a slot: renew its expiry and succeed (re-entrant acquire).
    Renew(Holder),
    /// Slot `slot` is free: try to claim it, guarded by the snapshot's [`Guard`].
    Grant {
        slot: u32,
    },
    Refuse(Refusal),
}

/// The semaphore arithmetic. Lowering the slot count never evicts holders: while more hosts hold
/// than there are slots, or any host holds a slot numbered at or above the new count, new grants
/// stop. The free slot is picked from the id so concurrent requests tend to pick different slots.
pub fn decide(
    snapshot: &GroupSnapshot,
    id: &str,
    default_slots: u32,
    new_grants_open: bool,
) -> Decision {
    if let Some(h) = snapshot.holder(id) {
        return Decision::Renew(h.clone());
    }
    if !new_grants_open {
        return Decision::Refuse(Refusal::NewGrantsClosed {
            group: snapshot.group.clone(),
        });
    }
    let slots = snapshot.slots.unwrap_or(default_slots);
    let held = snapshot.holders.len();
    if held >= slots as usize {
        return Decision::Refuse(Refusal::NoSlot {
            group: snapshot.group.clone(),
            slots,
            held,
        });
    }
    if let Some(h) = snapshot.holders.iter().find(|h| h.slot >= slots) {
        return Decision::Refuse(Refusal::Lowered {
            group: snapshot.group.clone(),
            slots,
            slot: h.slot,
        });
    }
    // held < slots and every holder is below `slots`, so at least one slot is free. Start at the
    // id's home slot and probe upwards: concurrent requests from different ids mostly try
    // different slots and so do not conflict.
    let home = (id_hash(id) % u64::from(slots)) as u32;
    let slot = (0..slots)
        .map(|i| (home + i) % slots)
        .find(|i| !snapshot.holders.iter().any(|h| h.slot == *i))
        .expect("a free slot exists when held < slots");
    Decision::Grant { slot }
}

/// FNV-1a of the id: a stable spread of ids over free slots.
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Largest slot count of a group.
pub const MAX_SLOTS: u32 = 10_000;

/// Storage failure. `Unavailable` means the store could not be reached at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("etcd unavailable ({endpoints}): {reason}")]
    Unavailable { endpoints: String, reason: String },
    #[error("etcd error ({endpoints}): {reason}")]
    Failed { endpoints: String, reason: String },
    #[error("unreadable etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// A grant to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest<'a> {
    pub group: &'a str,
    pub id: &'a str,
    pub slot: u32,
    /// Slot count the decision was made with (slots numbered at or above must all be free).
    pub slots: u32,
    pub guard: Guard,
    pub lease_seconds: u64,
}

/// Storage of slot counts and holders. Every method is one atomic step on the store.
pub trait SlotStore: Send + Sync {
    /// Config, holders and guard of one group, all from the same store revision.
    fn read_group(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<GroupSnapshot, StoreError>> + Send;
    /// Writes the holder into its slot with a fresh expiry if the slot is still free, no slot at or
    /// above `slots` is held, the guard still matches and the id holds nothing; `Ok(false)` when
    /// something changed since the snapshot (nothing was written).
    fn try_grant(
        &self,
        grant: GrantRequest<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Pushes the holder's expiry back to a full lease; `Ok(false)` if it no longer holds (expired
    /// or released since the snapshot).
    fn renew(
        &self,
        group: &str,
        holder: &Holder,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Removes the holder; `Ok(false)` if it held nothing (releasing is idempotent).
    fn release(
        &self,
        group: &str,
        id: &str,
        reason: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Tunables of a [`Semaphore`].
#[derive(Debug, Clone)]
pub struct SemaphoreConfig {
    /// Slot count of groups that have no config in the store.
    pub default_slots: u32,
    /// Expiry of a holder that stops reporting (longest expected reboot).
    pub lease_seconds: u64,
    /// Read-decide-write rounds before giving up under contention.
    pub max_attempts: u32,
}

impl Default for SemaphoreConfig {
    fn default() -> Self {
        SemaphoreConfig {
            default_slots: 1,
            lease_seconds: 900,
            max_attempts: 64,
        }
    }
}

/// Result of a successful acquire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A new slot was granted.
    Granted,
    /// The id already held a slot; its expiry was renewed.
    Renewed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("group {group}: gave up after {attempts} attempts under contention, retry later")]
    Contention { group: String, attempts: u32 },
}

/// The semaphore over a store.
pub struct Semaphore<S> {
    store: S,
    config: SemaphoreConfig,
    conflicts: std::sync::atomic::AtomicU64,
}

impl<S: SlotStore> Semaphore<S> {
    pub fn new(store: S, config: SemaphoreConfig) -> Self {
        Semaphore {
            store,
            config,
            conflicts: Default::default(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn config(&self) -> &SemaphoreConfig {
        &self.config
    }

    /// Grant or renewal attempts that had to start over because the store changed under them.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn conflict(&self) {
        self.conflicts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes (or renews) a slot for `id` in `group`. With `new_grants_open == false` only a renewal
    /// of an existing hold can succeed.
    pub async fn acquire(
        &self,
        group: &str,
        id: &str,
        new_grants_open: bool,
    ) -> Result<Acquired, AcquireError> {
        for _ in 0..self.config.max_attempts {
            let snapshot = self.store.read_group(group).await?;
            match decide(&snapshot, id, self.config.default_slots, new_grants_open) {
                Decision::Renew(holder) => {
                    if self.store.renew(group, &holder).await? {
                        return Ok(Acquired::Renewed);
                    }
                    // Expired between read and renew: decide again on fresh data.
                    self.conflict();
                }
                Decision::Grant { slot } => {
                    let grant = GrantRequest {
                        group,
                        id,
                        slot,
                        slots: snapshot.slots.unwrap_or(self.config.default_slots),
                        guard: snapshot.guard,
                        lease_seconds: self.config.lease_seconds,
                    };
                    if self.store.try_grant(grant).await? {
                        return Ok(Acquired::Granted);
                    }
                    // Another grant took that slot, or the slot count changed: read again.
                    self.conflict();
                }
                Decision::Refuse(r) => return Err(AcquireError::Refused(r)),
            }
        }
        Err(AcquireError::Contention {
            group: group.to_string(),
            attempts: self.config.max_attempts,
        })
    }

    /// Gives the slot back; `Ok(false)` if `id` held nothing.
    pub async fn release(&self, group: &str, id: &str) -> Result<bool, StoreError> {
        self.store.release(group, id, "steady-state").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holders are given slots 0, 1, 2... in order.
    fn snapshot(slots: Option<u32>, ids: &[&str]) -> GroupSnapshot {
        snapshot_at(
            slots,
            &ids.iter()
                .enumerate()
                .map(|(i, id)| (*id, i as u32))
                .collect::<Vec<_>>(),
        )
    }

    fn snapshot_at(slots: Option<u32>, holders: &[(&str, u32)]) -> GroupSnapshot {
        GroupSnapshot {
            group: "g".into(),
            slots,
            holders: holders
                .iter()
                .map(|(id, slot)| Holder {
                    id: id.to_string(),
                    acquired_unix_ms: 0,
                    slot: *slot,
                    lease: i64::from(*slot) + 1,
                })
                .collect(),
            guard: Guard::default(),
        }
    }

    fn describe(d: Decision) -> String {
        match d {
            Decision::Renew(h) => format!("renew {}", h.id),
            Decision::Grant { .. } => "grant".to_string(),
            Decision::Refuse(r) => format!("refuse: {r}"),
        }
    }

    fn check(slots: Option<u32>, ids: &[&str], id: &str, open: bool, expected: &str) {
        let got = match decide(&snapshot(slots, ids), id, 1, open) {
            Decision::Renew(h) => format!("renew {}", h.id),
            Decision::Grant { .. } => "grant".to_string(),
            Decision::Refuse(r) => format!("refuse: {r}"),
        };
        assert_eq!(got, expected, "slots {slots:?} holders {ids:?} id {id}");
    }

    #[test]
    fn decisions() {
        check(Some(3), &[], "a", true, "grant");
        check(Some(3), &["x", "y"], "a", true, "grant");
        check(
            Some(3),
            &["x", "y", "z"],
            "a",
            true,
            "refuse: group g: 3 of 3 reboot slots are taken, retry later",
        );
        // Re-entrant, even when full or when the window is closed.
        check(Some(3), &["x", "y", "a"], "a", true, "renew a");
        check(Some(1), &["a"], "a", false, "renew a");
        // Default slot count for unconfigured groups.
        check(None, &[], "a", true, "grant");
        check(
            None,
            &["x"],
            "a",
            true,
            "refuse: group g: 1 of 1 reboot slots are taken, retry later",
        );
        // Lowering the count below the holders never evicts, it only stops grants.
        check(
            Some(1),
            &["x", "y", "z"],
            "a",
            true,
            "refuse: group g: 3 of 1 reboot slots are taken, retry later",
        );
        check(Some(1), &["x", "y", "z"], "y", true, "renew y");
        check(
            Some(0),
            &[],
            "a",
            true,
            "refuse: group g: 0 of 0 reboot slots are taken, retry later",
        );
        check(
            Some(3),
            &[],
            "a",
            false,
            "refuse: group g: the reboot window is closed, retry later",
        );
    }

    #[test]
    fn slot_numbers() {
        // The granted slot is a free one.
        for id in ["a", "b", "c", "d", "e", "f"] {
            match decide(&snapshot_at(Some(4), &[("x", 0), ("y", 2)]), id, 1, true) {
                Decision::Grant { slot } => assert!(slot == 1 || slot == 3, "{id}: {slot}"),
                d => panic!("{id}: {d:?}"),
            }
        }
        // After lowering 3 -> 2, a holder still in slot 2 blocks grants even though only one
        // host holds: otherwise slots 0 and 1 could both be granted, three holders for two slots.
        assert_eq!(
            describe(decide(&snapshot_at(Some(2), &[("x", 2)]), "a", 1, true)),
            "refuse: group g: slot 2 is still held since the slot count was lowered to 2, retry later"
        );
        assert_eq!(
            describe(decide(&snapshot_at(Some(2), &[("x", 1)]), "a", 1, true)),
            "grant"
        );
        // Different ids spread over the free slots.
        let picks: std::collections::BTreeSet<u32> = (0..50)
            .filter_map(
                |i| match decide(&snapshot(Some(16), &[]), &format!("host-{i}"), 1, true) {
                    Decision::Grant { slot } => Some(slot),
                    _ => None,
                },
            )
            .collect();
        assert!(picks.len() > 8, "{picks:?}");
    }
}

//! Counters of one coordinator process, rendered in the Prometheus text format.

use crate::etcd_store::GroupStatus;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use twinroot_format::fleetlock::ErrorKind;

#[derive(Debug, Default)]
pub struct Metrics {
    pub grants: AtomicU64,
    pub renewals: AtomicU64,
    pub releases: AtomicU64,
    pub releases_not_held: AtomicU64,
    pub expiries: AtomicU64,
    pub etcd_errors: AtomicU64,
    refusals: [AtomicU64; ErrorKind::ALL.len()],
}

/// Escapes a Prometheus label value (group names come from etcd keys, which anyone with etcd
/// access can write).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn kind_index(kind: ErrorKind) -> usize {
    ErrorKind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is in ALL")
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, kind: ErrorKind) {
        self.refusals[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusals(&self, kind: ErrorKind) -> u64 {
        self.refusals[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Prometheus text exposition. `groups` is the etcd view at scrape time (`None`: etcd down).
    pub fn render(
        &self,
        groups: Option<&[GroupStatus]>,
        default_slots: u32,
        grant_conflicts: u64,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP reboot_coordinator_grant_conflicts_total Acquire attempts restarted because \
             another grant took the chosen slot or the slot count changed."
        );
        let _ = writeln!(
            out,
            "# TYPE reboot_coordinator_grant_conflicts_total counter"
        );
        let _ = writeln!(
            out,
            "reboot_coordinator_grant_conflicts_total {grant_conflicts}"
        );
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            &mut out,
            "reboot_coordinator_grants_total",
            "New reboot slots granted by this coordinator.",
            &self.grants,
        );
        counter(
            &mut out,
            "reboot_coordinator_renewals_total",
            "Repeated pre-reboot calls that renewed an existing slot's lease.",
            &self.renewals,
        );
        counter(
            &mut out,
            "reboot_coordinator_releases_total",
            "Slots given back through steady-state.",
            &self.releases,
        );
        counter(
            &mut out,
            "reboot_coordinator_releases_not_held_total",
            "Steady-state calls for ids that held no slot (idempotent no-ops).",
            &self.releases_not_held,
        );
        counter(
            &mut out,
            "reboot_coordinator_expiries_total",
            "Slots freed because the holder's lease expired (seen by this coordinator).",
            &self.expiries,
        );
        counter(
            &mut out,
            "reboot_coordinator_etcd_errors_total",
            "etcd calls that failed or timed out.",
            &self.etcd_errors,
        );
        let _ = writeln!(
            out,
            "# HELP reboot_coordinator_refusals_total Non-200 answers by FleetLock error kind."
        );
        let _ = writeln!(out, "# TYPE reboot_coordinator_refusals_total counter");
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "reboot_coordinator_refusals_total{{kind=\"{kind}\"}} {}",
                self.refusals(kind)
            );
        }
        let _ = writeln!(
            out,
            "# HELP reboot_coordinator_etcd_up 1 if etcd answered the scrape-time read."
        );
        let _ = writeln!(out, "# TYPE reboot_coordinator_etcd_up gauge");
        let _ = writeln!(
            out,
            "reboot_coordinator_etcd_up {}",
            u8::from(groups.is_some())
        );
        if let Some(groups) = groups {
            let _ = writeln!(
                out,
                "# HELP reboot_coordinator_group_slots Reboot slot count per group."
            );
            let _ = writeln!(out, "# TYPE reboot_coordinator_group_slots gauge");
            for g in groups {
                let _ = writeln!(
                    out,
                    "reboot_coordinator_group_slots{{group=\"{}\"}} {}",
                    label_value(&g.group),
                    g.slots.unwrap_or(default_slots)
                );
            }
            let _ = writeln!(
                out,
                "# HELP reboot_coordinator_group_holders Hosts holding a reboot slot per group."
            );
            let _ = writeln!(out, "# TYPE reboot_coordinator_group_holders gauge");
            for g in groups {
                let _ = writeln!(
                    out,
                    "reboot_coordinator_group_holders{{group=\"{}\"}} {}",
                    label_value(&g.group),
                    g.holders.len()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_escapes_labels_and_lists_every_kind() {
        let m = Metrics::default();
        m.refused(ErrorKind::NoSlotAvailable);
        Metrics::inc(&m.grants);
        let groups = [GroupStatus {
            group: "we\"ird\\".into(),
            slots: None,
            holders: vec![],
        }];
        let text = m.render(Some(&groups), 3, 7);
        assert!(
            text.contains("reboot_coordinator_group_slots{group=\"we\\\"ird\\\\\"} 3"),
            "{text}"
        );
        assert!(text.contains("reboot_coordinator_grants_total 1\n"));
        assert!(text.contains("reboot_coordinator_grant_conflicts_total 7\n"));
        assert!(text.contains("reboot_coordinator_refusals_total{kind=\"no_slot_available\"} 1\n"));
        for k in ErrorKind::ALL {
            assert!(text.contains(&format!(
                "reboot_coordinator_refusals_total{{kind=\"{k}\"}}"
            )));
        }
        let down = m.render(None, 3, 0);
        assert!(down.contains("reboot_coordinator_etcd_up 0\n"));
        assert!(!down.contains("group_slots{"));
    }
}

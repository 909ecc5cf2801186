//! The reboot coordinator's read-only status, `GET /v1/status` (JSON): the reboot slots of each
//! group and how many are held. The coordinator serves it; the update-server's dashboard reads it
//! to show "reboot slots in use". No host ids: like `/metrics`, it needs no token.

use serde::{Deserialize, Serialize};

/// Path of the status endpoint.
pub const STATUS_PATH: &str = "/v1/status";

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    /// Slots of a group that has no slot count of its own.
    pub default_slots: u32,
    /// Groups that have a slot count or a holder, by name.
    pub groups: Vec<GroupSlots>,
}

/// One group's slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSlots {
    pub group: String,
    /// Reboot slots of the group (its own count, or the default).
    pub slots: u32,
    /// Slots held now (hosts between pre-reboot and steady-state).
    pub in_use: u32,
}

impl CoordinatorStatus {
    /// (in use, total) over every group; a coordinator that knows no group yet has the default
    /// group's slots, all free.
    pub fn totals(&self) -> (u32, u32) {
        if self.groups.is_empty() {
            return (0, self.default_slots);
        }
        self.groups
            .iter()
            .fold((0, 0), |(u, t), g| (u + g.in_use, t + g.slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_groups_or_fall_back_to_the_default() {
        let mut s = CoordinatorStatus {
            default_slots: 2,
            groups: vec![],
        };
        assert_eq!(s.totals(), (0, 2));
        s.groups = vec![
            GroupSlots {
                group: "default".into(),
                slots: 2,
                in_use: 1,
            },
            GroupSlots {
                group: "db".into(),
                slots: 1,
                in_use: 1,
            },
        ];
        assert_eq!(s.totals(), (2, 3));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<CoordinatorStatus>(&json).unwrap(), s);
    }
}

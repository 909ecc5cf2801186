//! A/B slot boot state, as the CoreOS/ChromeOS scheme stores it in a GPT entry's attribute field.
//!
//! Pure data and rules: no I/O. The agent, the boot selector, image-tool and the fleet simulator all
//! decide through these functions, so they can never disagree about the bits.
//!
//! Bit layout of the 64-bit GPT attribute field (see docs/FORMAT.md):
//! - bits 48-51: priority (0-15; 0 = never boot),
//! - bits 52-55: tries left (0-15),
//! - bit 56: successful.

use std::fmt;
use std::str::FromStr;

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u32 = 56;
const NIBBLE: u64 = 0xf;
/// All bits this module owns; every other attribute bit is preserved untouched.
const SLOT_BITS: u64 = (NIBBLE << PRIORITY_SHIFT) | (NIBBLE << TRIES_SHIFT) | (1 << SUCCESSFUL_BIT);

/// The highest value the 4-bit priority and tries fields can hold.
pub const MAX_NIBBLE: u8 = 15;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub const ALL: [SlotName; 2] = [SlotName::A, SlotName::B];

    /// The GPT partition label of this slot.
    pub fn label(self) -> &'static str {
        match self {
            SlotName::A => "USR-A",
            SlotName::B => "USR-B",
        }
    }

    /// The slot that is not this one.
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    /// Index into a `[_; 2]` slot array (A = 0, B = 1).
    pub fn index(self) -> usize {
        match self {
            SlotName::A => 0,
            SlotName::B => 1,
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotName::A => "a",
            SlotName::B => "b",
        })
    }
}

/// Error for a slot name that is neither `a` nor `b`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown slot {0:?}: expected \"a\" or \"b\"")]
pub struct UnknownSlot(pub String);

impl FromStr for SlotName {
    type Err = UnknownSlot;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "a" | "A" | "USR-A" => Ok(SlotName::A),
            "b" | "B" | "USR-B" => Ok(SlotName::B),
            other => Err(UnknownSlot(other.to_string())),
        }
    }
}

/// The boot state of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotAttrs {
    /// 0-15; 0 means the slot is never booted.
    pub priority: u8,
    /// Boot attempts left before the slot is given up on (0-15).
    pub tries: u8,
    /// The slot has booted and passed its post-boot checks.
    pub successful: bool,
}

impl SlotAttrs {
    /// A slot that must never boot (priority 0, no tries, not successful).
    pub const UNBOOTABLE: SlotAttrs = SlotAttrs {
        priority: 0,
        tries: 0,
        successful: false,
    };

    /// Decodes the slot bits of a GPT attribute field.
    pub fn from_bits(attribute_bits: u64) -> Self {
        SlotAttrs {
            priority: ((attribute_bits >> PRIORITY_SHIFT) & NIBBLE) as u8,
            tries: ((attribute_bits >> TRIES_SHIFT) & NIBBLE) as u8,
            successful: (attribute_bits >> SUCCESSFUL_BIT) & 1 == 1,
        }
    }

    /// Writes these slot bits into a GPT attribute field, keeping every other bit as it was.
    /// Priority and tries are clamped to 15.
    pub fn apply_to(self, attribute_bits: u64) -> u64 {
        let priority = u64::from(self.priority.min(MAX_NIBBLE));
        let tries = u64::from(self.tries.min(MAX_NIBBLE));
        (attribute_bits & !SLOT_BITS)
            | (priority << PRIORITY_SHIFT)
            | (tries << TRIES_SHIFT)
            | (u64::from(self.successful) << SUCCESSFUL_BIT)
    }

    /// Whether the boot selector may pick this slot.
    pub fn is_bootable(&self) -> bool {
        self.priority > 0 && (self.tries > 0 || self.successful)
    }
}

impl fmt::Display for SlotAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "priority={} tries={} successful={}",
            self.priority,
            self.tries,
            u8::from(self.successful)
        )
    }
}

/// A slot and its boot state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    pub name: SlotName,
    pub attrs: SlotAttrs,
}

/// What the boot selector does: boot `slot`, and first write one try less to disk when
/// `consume_try` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootChoice {
    pub slot: SlotName,
    pub consume_try: bool,
}

/// The CoreOS `gptprio.next` rule: among slots with `tries > 0 || successful` and a non-zero
/// priority, take the highest priority (ties: the first entry, slot A). A chosen slot with tries
/// left consumes one try (written to disk before booting it, see [`after_boot_attempt`]).
pub fn choose_boot(slots: &[SlotState; 2]) -> Option<BootChoice> {
    let mut best: Option<&SlotState> = None;
    for slot in slots.iter().filter(|s| s.attrs.is_bootable()) {
        if best.is_none_or(|b| slot.attrs.priority > b.attrs.priority) {
            best = Some(slot);
        }
    }
    best.map(|s| BootChoice {
        slot: s.name,
        consume_try: s.attrs.tries > 0,
    })
}

/// The state written back before booting a slot chosen with `consume_try`: one try fewer.
pub fn after_boot_attempt(attrs: SlotAttrs) -> SlotAttrs {
    SlotAttrs {
        tries: attrs.tries.saturating_sub(1),
        ..attrs
    }
}

/// The state of a freshly written slot: above the other slot's priority, `tries` boot attempts,
/// not yet successful. Returns the new attributes of the staged slot and of the other slot (whose
/// priority may have to come down so that the staged slot is strictly higher).
pub fn staged(other: SlotAttrs, tries: u8) -> (SlotAttrs, SlotAttrs) {
    let tries = tries.clamp(1, MAX_NIBBLE);
    let mut other = other;
    if other.priority >= MAX_NIBBLE {
        other.priority = MAX_NIBBLE - 1;
    }
    let new = SlotAttrs {
        priority: other.priority.max(1) + 1,
        tries,
        successful: false,
    };
    (new, other)
}

/// The state of a slot that booted and passed its checks (`cgpt add -S1 -T0`).
pub fn mark_good(attrs: SlotAttrs) -> SlotAttrs {
    SlotAttrs {
        priority: attrs.priority.max(1),
        tries: 0,
        successful: true,
    }
}

/// The state of a slot that failed: never booted again until rewritten.
pub fn mark_bad(_attrs: SlotAttrs) -> SlotAttrs {
    SlotAttrs::UNBOOTABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(priority: u8, tries: u8, successful: bool) -> SlotAttrs {
        SlotAttrs {
            priority,
            tries,
            successful,
        }
    }

    fn table(a: SlotAttrs, b: SlotAttrs) -> [SlotState; 2] {
        [
            SlotState {
                name: SlotName::A,
                attrs: a,
            },
            SlotState {
                name: SlotName::B,
                attrs: b,
            },
        ]
    }

    #[test]
    fn bits_round_trip_and_keep_other_bits() {
        let other_bits = 0x8000_0000_0000_0001u64 | (1 << 60);
        for p in 0..=15 {
            for t in 0..=15 {
                for s in [false, true] {
                    let a = attrs(p, t, s);
                    let bits = a.apply_to(other_bits);
                    assert_eq!(SlotAttrs::from_bits(bits), a);
                    assert_eq!(bits & !SLOT_BITS, other_bits);
                }
            }
        }
    }

    #[test]
    fn exact_bit_positions() {
        let bits = attrs(2, 1, true).apply_to(0);
        assert_eq!(bits, (2 << 48) | (1 << 52) | (1 << 56));
        assert_eq!(SlotAttrs::from_bits(0x0001_0000_0000_0000).priority, 1);
        assert_eq!(SlotAttrs::from_bits(0x00f0_0000_0000_0000).tries, 15);
        assert!(SlotAttrs::from_bits(0x0100_0000_0000_0000).successful);
    }

    #[test]
    fn apply_clamps_out_of_range_values() {
        let bits = attrs(200, 99, false).apply_to(0);
        assert_eq!(SlotAttrs::from_bits(bits), attrs(15, 15, false));
    }

    fn check(a: SlotAttrs, b: SlotAttrs, expected: Option<(SlotName, bool)>) {
        let got = choose_boot(&table(a, b)).map(|c| (c.slot, c.consume_try));
        assert_eq!(got, expected, "a=({a}) b=({b})");
    }

    #[test]
    fn choose_boot_cases() {
        use SlotName::*;
        // Plain good slot.
        check(attrs(1, 0, true), SlotAttrs::UNBOOTABLE, Some((A, false)));
        // Freshly staged B outranks good A and consumes its try.
        check(attrs(1, 0, true), attrs(2, 1, false), Some((B, true)));
        // B's try used up without success: back to A.
        check(attrs(1, 0, true), attrs(2, 0, false), Some((A, false)));
        // Priority 0 never boots, even when successful.
        check(attrs(0, 0, true), attrs(1, 0, true), Some((B, false)));
        // Ties go to the first entry.
        check(attrs(2, 0, true), attrs(2, 0, true), Some((A, false)));
        // Nothing bootable.
        check(attrs(1, 0, false), attrs(0, 3, false), None);
        check(SlotAttrs::UNBOOTABLE, SlotAttrs::UNBOOTABLE, None);
        // A successful slot with tries left still consumes one (cgpt semantics).
        check(attrs(3, 2, true), attrs(1, 0, true), Some((A, true)));
    }

    #[test]
    fn staged_slot_boots_once_then_falls_back() {
        let good = mark_good(attrs(1, 0, false));
        let (new, good) = staged(good, 1);
        let mut t = table(good, new);
        let first = choose_boot(&t).unwrap();
        assert_eq!(first.slot, SlotName::B);
        assert!(first.consume_try);
        t[1].attrs = after_boot_attempt(t[1].attrs);
        // The new slot never reported success: the next boot takes A by itself.
        assert_eq!(choose_boot(&t).unwrap().slot, SlotName::A);
    }

    #[test]
    fn staged_from_top_priority_lowers_the_other() {
        let (new, other) = staged(attrs(15, 0, true), 1);
        assert!(new.priority > other.priority);
        assert_eq!(new.priority, 15);
        assert!(other.is_bootable());
    }

    #[test]
    fn mark_good_and_bad() {
        assert_eq!(mark_good(attrs(2, 0, false)), attrs(2, 0, true));
        assert!(!mark_bad(attrs(2, 1, true)).is_bootable());
    }

    #[test]
    fn slot_names_parse() {
        assert_eq!("a".parse::<SlotName>().unwrap(), SlotName::A);
        assert_eq!("USR-B".parse::<SlotName>().unwrap(), SlotName::B);
        assert!("c".parse::<SlotName>().is_err());
        assert_eq!(SlotName::A.other(), SlotName::B);
        assert_eq!(SlotName::B.label(), "USR-B");
    }
}

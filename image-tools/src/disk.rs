//! `image-tool disk create` and `image-tool disk show`.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use twinroot_format::gpt::{DiskLayout, Extent, SlotDisk, create_disk};
use twinroot_format::slot::{SlotAttrs, SlotName, mark_good};

use crate::output::StagedOutput;

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024; "KiB", "MB" etc. too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("bad size {text:?}: expected a number like 512M or 2G"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("bad size {text:?}: unknown unit {unit:?}")),
    };
    num.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Options of `image-tool disk create`.
pub struct DiskCreateOptions {
    pub out: PathBuf,
    pub slot_size: u64,
    pub state_size: u64,
    pub image: PathBuf,
}

/// Creates a GPT disk image with USR-A holding `image` (marked good: priority 1, tries 0,
/// successful 1), an empty unbootable USR-B and a STATE partition.
pub fn create(opts: &DiskCreateOptions) -> Result<()> {
    let image = File::open(&opts.image)
        .with_context(|| format!("{}: cannot open image", opts.image.display()))?;
    let image_len = image
        .metadata()
        .with_context(|| format!("{}: cannot stat", opts.image.display()))?
        .len();
    if image_len > opts.slot_size {
        bail!(
            "{}: image is {image_len} bytes, larger than the slot size {}",
            opts.image.display(),
            opts.slot_size
        );
    }
    let out = StagedOutput::new(&opts.out)?;
    let layout = DiskLayout {
        slot_size: opts.slot_size,
        state_size: opts.state_size,
    };
    let mut disk = create_disk(out.path(), &layout)?;
    let mut writer = disk.slot_writer(SlotName::A, None)?;
    let copied = std::io::copy(&mut BufReader::with_capacity(1 << 20, image), &mut writer)
        .with_context(|| {
            format!(
                "{}: cannot copy {} into slot A",
                opts.out.display(),
                opts.image.display()
            )
        })?;
    writer.flush()?;
    writer.finish()?;
    if copied != image_len {
        bail!("{}: changed while being copied", opts.image.display());
    }
    disk.set_attrs(SlotName::A, mark_good(SlotAttrs::UNBOOTABLE))?;
    drop(disk);
    out.commit()
}

/// One slot as `disk show` reports it.
pub struct SlotReport {
    pub slot: SlotName,
    pub label: &'static str,
    pub partition: u32,
    pub extent: Extent,
    pub attrs: SlotAttrs,
}

/// Reads the slot table of a disk image or block device.
pub fn show(path: &Path) -> Result<(Vec<SlotReport>, Option<Extent>)> {
    let disk = SlotDisk::open(path)?;
    let slots = [SlotName::A, SlotName::B]
        .into_iter()
        .map(|slot| SlotReport {
            slot,
            label: slot.label(),
            partition: disk.partition_number(slot),
            extent: disk.slot_extent(slot),
            attrs: disk.attrs(slot),
        })
        .collect();
    Ok((slots, disk.state_extent()))
}

pub fn describe(path: &Path, slots: &[SlotReport], state: Option<Extent>) -> String {
    let mut out = format!("{}\n", path.display());
    for s in slots {
        out.push_str(&format!(
            "slot {} ({}, partition {}): priority={} tries={} successful={} offset={} size={}{}\n",
            s.slot,
            s.label,
            s.partition,
            s.attrs.priority,
            s.attrs.tries,
            u8::from(s.attrs.successful),
            s.extent.offset,
            s.extent.len,
            if s.attrs.is_bootable() {
                ""
            } else {
                " (not bootable)"
            }
        ));
    }
    match state {
        Some(e) => out.push_str(&format!("state: offset={} size={}\n", e.offset, e.len)),
        None => out.push_str("state: none\n"),
    }
    out
}

pub fn json(slots: &[SlotReport], state: Option<Extent>) -> serde_json::Value {
    serde_json::json!({
        "slots": slots.iter().map(|s| serde_json::json!({
            "slot": s.slot.to_string(),
            "label": s.label,
            "partition": s.partition,
            "offset": s.extent.offset,
            "size": s.extent.len,
            "priority": s.attrs.priority,
            "tries": s.attrs.tries,
            "successful": s.attrs.successful,
            "bootable": s.attrs.is_bootable(),
        })).collect::<Vec<_>>(),
        "state": state.map(|e| serde_json::json!({"offset": e.offset, "size": e.len})),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}

//! The A/B slot table on a GPT disk (a block device or a disk image file).
//!
//! Slots are the partitions labelled `USR-A` and `USR-B` (or, failing labels, the first two
//! partitions with the CoreOS usr type GUID). Their boot state lives in the attribute field of their
//! GPT entries, decoded by [`crate::slot`].
//!
//! Every update rewrites the primary GPT (header + entry array), syncs it to stable storage, then
//! rewrites the backup GPT and syncs again. Each copy carries CRC32s over itself, and readers fall
//! back to the backup when the primary fails its checks, so a power cut at any point leaves one
//! consistent table: either the old one or the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use gptman::{GPT, GPTHeader, GPTPartitionEntry};

use crate::slot::{SlotAttrs, SlotName, SlotState};

/// Partition type GUID of CoreOS `/usr` slots.
pub const USR_PARTITION_TYPE: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
/// Partition type GUID of the state partition (Linux filesystem data).
pub const STATE_PARTITION_TYPE: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
/// GPT label of the state partition, which survives updates.
pub const STATE_LABEL: &str = "STATE";
/// Partition numbers used by [`create_disk`] (the CoreOS numbering for the slots).
pub const USR_A_PARTITION: u32 = 3;
pub const USR_B_PARTITION: u32 = 4;
pub const STATE_PARTITION: u32 = 9;

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// Errors from reading or writing the slot table.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no valid GPT (primary and backup both unreadable): {source}")]
    Table {
        path: String,
        #[source]
        source: gptman::Error,
    },
    #[error(
        "{path}: cannot find slot {slot} (no partition labelled {label} nor a second usr-type partition)"
    )]
    MissingSlot {
        path: String,
        slot: SlotName,
        label: &'static str,
    },
    #[error("{path}: slot {slot} is the booted slot and is never opened for writing")]
    ActiveSlot { path: String, slot: SlotName },
    #[error("{path}: slot {slot} holds {capacity} bytes; refusing to write past its end")]
    SlotFull {
        path: String,
        slot: SlotName,
        capacity: u64,
    },
    #[error("{path}: invalid disk layout: {reason}")]
    Layout { path: String, reason: String },
}

/// A disk the slot table can live on: random access plus a durability barrier.
pub trait Disk: Read + Write + Seek {
    /// Flushes everything written so far to stable storage.
    fn sync(&mut self) -> io::Result<()>;
}

impl Disk for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl Disk for io::Cursor<Vec<u8>> {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where one partition sits on the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// An open disk with its A/B slot table.
pub struct SlotDisk<D: Disk = File> {
    disk: D,
    /// Shown in errors; also used to open slot writers for file-backed disks.
    path: PathBuf,
    gpt: GPT,
    /// GPT partition numbers (1-based) of slots A and B.
    slot_partitions: [u32; 2],
}

fn parse_guid(s: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(s)
        .expect("constant GUIDs are valid")
        .to_bytes_le()
}

impl SlotDisk<File> {
    /// Opens a disk read-only (enough for reading the table and the slots).
    pub fn open(path: &Path) -> Result<Self, GptError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        Self::from_disk(file, path)
    }

    /// Opens a disk read-write, for changing slot attributes.
    pub fn open_rw(path: &Path) -> Result<Self, GptError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        Self::from_disk(file, path)
    }

    /// Opens a writer over `target`'s partition. `booted` names the slot the running system booted
    /// from (if any); asking to write it is an error, so the active slot is never opened for writing.
    pub fn slot_writer(
        &self,
        target: SlotName,
        booted: Option<SlotName>,
    ) -> Result<SlotWriter, GptError> {
        if booted == Some(target) {
            return Err(GptError::ActiveSlot {
                path: self.path_str(),
                slot: target,
            });
        }
        let extent = self.slot_extent(target);
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| io_err(&self.path, e))?;
        Ok(SlotWriter {
            file,
            path: self.path_str(),
            slot: target,
            extent,
            written: 0,
        })
    }

    /// A reader over the first `len` bytes of `slot` (for read-back verification).
    pub fn slot_reader(&self, slot: SlotName, len: u64) -> Result<impl Read + use<>, GptError> {
        let extent = self.slot_extent(slot);
        if len > extent.len {
            return Err(GptError::SlotFull {
                path: self.path_str(),
                slot,
                capacity: extent.len,
            });
        }
        let mut file = File::open(&self.path).map_err(|e| io_err(&self.path, e))?;
        file.seek(SeekFrom::Start(extent.offset))
            .map_err(|e| io_err(&self.path, e))?;
        Ok(file.take(len))
    }
}

impl<D: Disk> SlotDisk<D> {
    /// Reads the slot table from any [`Disk`]; `path` names it in errors.
    pub fn from_disk(mut disk: D, path: &Path) -> Result<Self, GptError> {
        let gpt = GPT::find_from(&mut disk).map_err(|source| GptError::Table {
            path: path.display().to_string(),
            source,
        })?;
        let slot_partitions = find_slots(&gpt, path)?;
        Ok(SlotDisk {
            disk,
            path: path.to_path_buf(),
            gpt,
            slot_partitions,
        })
    }

    /// Gives the underlying disk back.
    pub fn into_disk(self) -> D {
        self.disk
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    fn entry(&self, slot: SlotName) -> &GPTPartitionEntry {
        &self.gpt[self.slot_partitions[slot.index()]]
    }

    /// Both slots and their boot state, A first.
    pub fn slots(&self) -> [SlotState; 2] {
        SlotName::ALL.map(|name| SlotState {
            name,
            attrs: SlotAttrs::from_bits(self.entry(name).attribute_bits),
        })
    }

    /// The boot state of one slot.
    pub fn attrs(&self, slot: SlotName) -> SlotAttrs {
        SlotAttrs::from_bits(self.entry(slot).attribute_bits)
    }

    /// The GPT partition number of a slot (3 and 4 on disks made by [`create_disk`]).
    pub fn partition_number(&self, slot: SlotName) -> u32 {
        self.slot_partitions[slot.index()]
    }

    /// Byte range of a slot's partition.
    pub fn slot_extent(&self, slot: SlotName) -> Extent {
        self.extent_of(self.slot_partitions[slot.index()])
    }

    /// Byte range of the state partition, if the disk has one.
    pub fn state_extent(&self) -> Option<Extent> {
        self.gpt
            .iter()
            .find(|(_, e)| e.is_used() && e.partition_name.as_str() == STATE_LABEL)
            .map(|(n, _)| self.extent_of(n))
    }

    fn extent_of(&self, partition: u32) -> Extent {
        let e = &self.gpt[partition];
        let ss = self.gpt.sector_size;
        Extent {
            offset: e.starting_lba * ss,
            len: (e.ending_lba + 1 - e.starting_lba) * ss,
        }
    }

    /// Sets one slot's boot state and writes the table durably (see the module docs for the order).
    pub fn set_attrs(&mut self, slot: SlotName, attrs: SlotAttrs) -> Result<(), GptError> {
        self.set_many(&[(slot, attrs)])
    }

    /// Sets several slots' boot state in one table update (one primary write, one backup write).
    pub fn set_many(&mut self, changes: &[(SlotName, SlotAttrs)]) -> Result<(), GptError> {
        for &(slot, attrs) in changes {
            let n = self.slot_partitions[slot.index()];
            let bits = self.gpt[n].attribute_bits;
            self.gpt[n].attribute_bits = attrs.apply_to(bits);
        }
        self.write_table()
    }

    fn write_table(&mut self) -> Result<(), GptError> {
        let path = self.path_str();
        let (mut primary, mut backup) = header_pair(&self.gpt.header);
        let entries: Vec<GPTPartitionEntry> = self.gpt.iter().map(|(_, e)| e.clone()).collect();
        let ss = self.gpt.sector_size;
        let disk = &mut self.disk;
        let result = (|| -> Result<(), gptman::Error> {
            primary.write_into(disk, ss, &entries)?;
            disk.sync()?;
            backup.write_into(disk, ss, &entries)?;
            disk.sync()?;
            Ok(())
        })();
        result.map_err(|e| match e {
            gptman::Error::Io(source) => GptError::Io { path, source },
            other => GptError::Io {
                path,
                source: io::Error::other(other.to_string()),
            },
        })?;
        self.gpt.header = primary;
        Ok(())
    }
}

/// The primary and backup headers describing the same table, whichever of the two was read.
fn header_pair(read: &GPTHeader) -> (GPTHeader, GPTHeader) {
    let mut primary = read.clone();
    if read.is_backup() {
        primary.primary_lba = read.backup_lba;
        primary.backup_lba = read.primary_lba;
        primary.partition_entry_lba = 2;
    }
    let mut backup = primary.clone();
    backup.primary_lba = primary.backup_lba;
    backup.backup_lba = primary.primary_lba;
    backup.partition_entry_lba = primary.last_usable_lba + 1;
    (primary, backup)
}

fn find_slots(gpt: &GPT, path: &Path) -> Result<[u32; 2], GptError> {
    let by_label = |label: &str| {
        gpt.iter()
            .find(|(_, e)| e.is_used() && e.partition_name.as_str() == label)
            .map(|(n, _)| n)
    };
    let usr_type = parse_guid(USR_PARTITION_TYPE);
    let mut by_type = gpt
        .iter()
        .filter(|(_, e)| e.is_used() && e.partition_type_guid == usr_type)
        .map(|(n, _)| n);
    let (first, second) = (by_type.next(), by_type.next());
    let missing = |slot: SlotName| GptError::MissingSlot {
        path: path.display().to_string(),
        slot,
        label: slot.label(),
    };
    let a = by_label("USR-A")
        .or(first)
        .ok_or_else(|| missing(SlotName::A))?;
    let b = by_label("USR-B")
        .or(second.filter(|&n| n != a))
        .or(first.filter(|&n| n != a))
        .ok_or_else(|| missing(SlotName::B))?;
    Ok([a, b])
}

fn io_err(path: &Path, source: io::Error) -> GptError {
    GptError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A bounded writer over one slot's partition. It cannot write past the partition's end, and it is
/// only handed out for a slot that is not the booted one.
pub struct SlotWriter {
    file: File,
    path: String,
    slot: SlotName,
    extent: Extent,
    written: u64,
}

impl SlotWriter {
    /// Bytes written so far from the start of the slot.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The slot's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.extent.len
    }

    /// Continues writing at `offset` bytes into the slot (resuming an interrupted write).
    pub fn seek_to(&mut self, offset: u64) -> Result<(), GptError> {
        if offset > self.extent.len {
            return Err(self.full());
        }
        self.written = offset;
        Ok(())
    }

    fn full(&self) -> GptError {
        GptError::SlotFull {
            path: self.path.clone(),
            slot: self.slot,
            capacity: self.extent.len,
        }
    }

    /// Syncs what was written to stable storage.
    pub fn finish(self) -> Result<u64, GptError> {
        self.file.sync_data().map_err(|source| GptError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.written)
    }
}

impl Write for SlotWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.extent.len {
            return Err(io::Error::other(self.full()));
        }
        let n = self.file.write_at(buf, self.extent.offset + self.written)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sizes of a disk made by [`create_disk`]. Sizes are rounded up to whole MiB.
#[derive(Debug, Clone, Copy)]
pub struct DiskLayout {
    pub slot_size: u64,
    /// 0 means no state partition.
    pub state_size: u64,
}

impl DiskLayout {
    /// Total size of the disk image: 1 MiB for the primary GPT, the partitions, 1 MiB at the end
    /// for the backup GPT.
    pub fn disk_size(&self) -> u64 {
        MIB + 2 * round_mib(self.slot_size) + round_mib(self.state_size) + MIB
    }
}

fn round_mib(n: u64) -> u64 {
    n.div_ceil(MIB) * MIB
}

/// Writes a new GPT disk image at `path` (which must not exist): protective MBR, USR-A (partition 3)
/// and USR-B (partition 4) with the CoreOS usr type and both slots unbootable, and STATE
/// (partition 9) when `state_size` > 0. Returns the open disk.
pub fn create_disk(path: &Path, layout: &DiskLayout) -> Result<SlotDisk<File>, GptError> {
    let layout_err = |reason: &str| GptError::Layout {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if layout.slot_size == 0 {
        return Err(layout_err("slot size must be greater than zero"));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let result = write_new_table(&mut file, layout);
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(match e {
            gptman::Error::Io(source) => io_err(path, source),
            other => layout_err(&other.to_string()),
        });
    }
    file.sync_all().map_err(|e| io_err(path, e))?;
    SlotDisk::from_disk(file, path)
}

fn write_new_table(file: &mut File, layout: &DiskLayout) -> Result<(), gptman::Error> {
    file.set_len(layout.disk_size())?;
    let mut gpt = GPT::new_from(file, SECTOR, *uuid::Uuid::new_v4().as_bytes())?;
    let slot_sectors = round_mib(layout.slot_size) / SECTOR;
    let state_sectors = round_mib(layout.state_size) / SECTOR;
    let usr_type = parse_guid(USR_PARTITION_TYPE);
    let mut start = MIB / SECTOR;
    let mut add = |number: u32, type_guid: [u8; 16], label: &str, sectors: u64| {
        gpt[number] = GPTPartitionEntry {
            partition_type_guid: type_guid,
            unique_partition_guid: *uuid::Uuid::new_v4().as_bytes(),
            starting_lba: start,
            ending_lba: start + sectors - 1,
            attribute_bits: SlotAttrs::UNBOOTABLE.apply_to(0),
            partition_name: label.into(),
        };
        start += sectors;
    };
    add(USR_A_PARTITION, usr_type, "USR-A", slot_sectors);
    add(USR_B_PARTITION, usr_type, "USR-B", slot_sectors);
    if state_sectors > 0 {
        add(
            STATE_PARTITION,
            parse_guid(STATE_PARTITION_TYPE),
            STATE_LABEL,
            state_sectors,
        );
    }
    GPT::write_protective_mbr_into(file, SECTOR)?;
    gpt.write_into(file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::{after_boot_attempt, choose_boot, mark_good, staged};

    fn attrs(priority: u8, tries: u8, successful: bool) -> SlotAttrs {
        SlotAttrs {
            priority,
            tries,
            successful,
        }
    }

    fn new_disk(dir: &Path) -> PathBuf {
        let path = dir.join("disk.img");
        create_disk(
            &path,
            &DiskLayout {
                slot_size: 4 * MIB,
                state_size: 2 * MIB,
            },
        )
        .unwrap();
        path
    }

    #[test]
    fn create_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_disk(dir.path());
        let disk = SlotDisk::open(&path).unwrap();
        assert_eq!(disk.partition_number(SlotName::A), 3);
        assert_eq!(disk.partition_number(SlotName::B), 4);
        assert!(disk.slots().iter().all(|s| !s.attrs.is_bootable()));
        let a = disk.slot_extent(SlotName::A);
        let b = disk.slot_extent(SlotName::B);
        assert_eq!(a.len, 4 * MIB);
        assert_eq!(a.offset, MIB);
        assert_eq!(b.offset, a.offset + a.len);
        assert_eq!(disk.state_extent().unwrap().len, 2 * MIB);
        assert!(
            create_disk(
                &path,
                &DiskLayout {
                    slot_size: MIB,
                    state_size: 0
                }
            )
            .is_err()
        );
    }

    #[test]
    fn attrs_persist_in_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_disk(dir.path());
        let mut disk = SlotDisk::open_rw(&path).unwrap();
        disk.set_attrs(SlotName::A, attrs(1, 0, true)).unwrap();
        disk.set_attrs(SlotName::B, attrs(2, 1, false)).unwrap();
        drop(disk);
        let disk = SlotDisk::open(&path).unwrap();
        assert_eq!(disk.attrs(SlotName::A), attrs(1, 0, true));
        assert_eq!(disk.attrs(SlotName::B), attrs(2, 1, false));

        // Destroy the primary header: the backup alone must give the same table.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_at(&[0u8; 512], SECTOR).unwrap();
        drop(f);
        let mut disk = SlotDisk::open_rw(&path).unwrap();
        assert_eq!(disk.attrs(SlotName::B), attrs(2, 1, false));
        // Writing from the backup repairs the primary.
        disk.set_attrs(SlotName::B, attrs(2, 0, false)).unwrap();
        drop(disk);
        let mut f = File::open(&path).unwrap();
        let gpt = GPT::read_from(&mut f, SECTOR).unwrap();
        assert!(gpt.header.is_primary());
        assert_eq!(
            SlotAttrs::from_bits(gpt[USR_B_PARTITION].attribute_bits),
            attrs(2, 0, false)
        );
    }

    #[test]
    fn slot_writer_refuses_active_slot_and_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_disk(dir.path());
        let disk = SlotDisk::open_rw(&path).unwrap();
        assert!(matches!(
            disk.slot_writer(SlotName::A, Some(SlotName::A)),
            Err(GptError::ActiveSlot { .. })
        ));
        let mut w = disk.slot_writer(SlotName::B, Some(SlotName::A)).unwrap();
        w.write_all(&vec![0xab; (4 * MIB) as usize]).unwrap();
        let err = w.write_all(&[1]).unwrap_err();
        assert!(
            err.to_string().contains("refusing to write past its end"),
            "{err}"
        );
        assert_eq!(w.finish().unwrap(), 4 * MIB);
        let mut back = Vec::new();
        disk.slot_reader(SlotName::B, 4 * MIB)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        // Slot A untouched.
        let mut a = Vec::new();
        disk.slot_reader(SlotName::A, 4 * MIB)
            .unwrap()
            .read_to_end(&mut a)
            .unwrap();
        assert!(a.iter().all(|&b| b == 0));
    }

    #[test]
    fn slots_found_by_type_when_unlabelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_disk(dir.path());
        {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut gpt = GPT::find_from(&mut f).unwrap();
            gpt[USR_A_PARTITION].partition_name = "".into();
            gpt[USR_B_PARTITION].partition_name = "".into();
            gpt.write_into(&mut f).unwrap();
        }
        let disk = SlotDisk::open(&path).unwrap();
        assert_eq!(disk.partition_number(SlotName::A), 3);
        assert_eq!(disk.partition_number(SlotName::B), 4);
    }

    #[test]
    fn missing_slot_is_named() {
        let mut buf = io::Cursor::new(vec![0u8; (8 * MIB) as usize]);
        let mut gpt = GPT::new_from(&mut buf, SECTOR, [7; 16]).unwrap();
        gpt[1] = GPTPartitionEntry {
            partition_type_guid: parse_guid(STATE_PARTITION_TYPE),
            unique_partition_guid: [1; 16],
            starting_lba: 2048,
            ending_lba: 4095,
            attribute_bits: 0,
            partition_name: "STATE".into(),
        };
        gpt.write_into(&mut buf).unwrap();
        let err = SlotDisk::from_disk(buf, Path::new("mem.img"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("USR-A"), "{err}");
        let err = SlotDisk::from_disk(io::Cursor::new(vec![0u8; 4096]), Path::new("zero.img"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("zero.img: no valid GPT"), "{err}");
    }

    /// An in-memory disk that loses power after `budget` bytes: later writes (and the rest of the
    /// write that crossed the line) never reach the medium.
    struct PowerCut {
        inner: io::Cursor<Vec<u8>>,
        budget: u64,
    }

    impl Read for PowerCut {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl Seek for PowerCut {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }
    impl Write for PowerCut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let keep = buf.len().min(self.budget as usize);
            self.budget -= keep as u64;
            self.inner.write_all(&buf[..keep])?;
            // Pretend the rest was written too: a power cut does not tell the writer.
            let pos = self.inner.position() + (buf.len() - keep) as u64;
            self.inner.set_position(pos);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Disk for PowerCut {
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn image_with(a: SlotAttrs, b: SlotAttrs) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        create_disk(
            &path,
            &DiskLayout {
                slot_size: MIB,
                state_size: 0,
            },
        )
        .unwrap()
        .set_many(&[(SlotName::A, a), (SlotName::B, b)])
        .unwrap();
        std::fs::read(&path).unwrap()
    }

    /// Runs `change` on a disk that loses power after every possible number of bytes and checks that
    /// the table read afterwards is either the old or the new one, and has a bootable slot.
    fn check_power_cuts(
        before: [SlotAttrs; 2],
        change: impl Fn(&mut SlotDisk<PowerCut>),
        after: [SlotAttrs; 2],
    ) {
        let image = image_with(before[0], before[1]);
        let mut budget = 0u64;
        let mut seen_old = false;
        let mut seen_new = false;
        loop {
            let disk = PowerCut {
                inner: io::Cursor::new(image.clone()),
                budget,
            };
            let mut disk = SlotDisk::from_disk(disk, Path::new("cut.img")).unwrap();
            change(&mut disk);
            let left = disk.disk.budget;
            let bytes = disk.into_disk().inner.into_inner();
            let reread = SlotDisk::from_disk(io::Cursor::new(bytes), Path::new("cut.img"))
                .expect("a power cut never leaves a disk without a valid table");
            let got = [reread.attrs(SlotName::A), reread.attrs(SlotName::B)];
            assert!(
                got == before || got == after,
                "cut after {budget} bytes: table is neither old nor new: {got:?}"
            );
            seen_old |= got == before;
            seen_new |= got == after;
            assert!(
                choose_boot(&reread.slots()).is_some(),
                "cut after {budget} bytes left no bootable slot"
            );
            if left > 0 {
                // The whole update fit in the budget: every cut point has been tried.
                break;
            }
            // A prime step lands cuts inside the header, inside entries and on their boundaries.
            budget += 61;
        }
        assert!(seen_old && seen_new);
    }

    #[test]
    fn power_cut_while_staging_an_update() {
        let good = mark_good(attrs(1, 0, false));
        let (new_b, a) = staged(good, 1);
        check_power_cuts(
            [good, SlotAttrs::UNBOOTABLE],
            |d| {
                d.set_many(&[(SlotName::A, a), (SlotName::B, new_b)])
                    .unwrap()
            },
            [a, new_b],
        );
    }

    #[test]
    fn power_cut_while_consuming_a_try() {
        let good = attrs(1, 0, true);
        let b = attrs(2, 1, false);
        check_power_cuts(
            [good, b],
            |d| d.set_attrs(SlotName::B, after_boot_attempt(b)).unwrap(),
            [good, after_boot_attempt(b)],
        );
    }

    #[test]
    fn power_cut_while_marking_good() {
        let a = attrs(1, 0, true);
        let b = attrs(2, 0, false);
        check_power_cuts(
            [a, b],
            |d| d.set_attrs(SlotName::B, mark_good(b)).unwrap(),
            [a, mark_good(b)],
        );
    }
}

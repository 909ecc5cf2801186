//! The agent's view of the A/B disk, behind the small [`SlotTable`] trait so the same core drives a
//! real disk (file or block device, through `twinroot_format::gpt`) and in-memory slots (tests and
//! the fleet simulator).
//!
//! The active slot is never opened for writing, by construction: the only way to get a writer is
//! [`SlotTable::open_writer`], which takes an [`InactiveSlot`]; the only way to get an
//! [`InactiveSlot`] is [`BootedSlot::inactive`]. The GPT implementation additionally hands the
//! booted slot to `SlotDisk::slot_writer`, which refuses it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use twinroot_format::gpt::SlotDisk;
use twinroot_format::slot::{SlotAttrs, SlotName, SlotState};

use crate::error::{AgentError, AgentResult, ErrorKind};

/// The slot the running system booted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootedSlot(SlotName);

/// The slot the running system did not boot from: the only slot that can be written.
/// It has no public constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InactiveSlot(SlotName);

impl BootedSlot {
    pub fn new(name: SlotName) -> Self {
        BootedSlot(name)
    }

    pub fn name(self) -> SlotName {
        self.0
    }

    pub fn inactive(self) -> InactiveSlot {
        InactiveSlot(self.0.other())
    }
}

impl InactiveSlot {
    pub fn name(self) -> SlotName {
        self.0
    }
}

/// Makes slot bytes `[offset, offset + len)` durable and, when asked to evict, drops them from
/// the page cache so the read that follows comes from the medium.
pub type Flusher = Box<dyn FnMut(u64, u64) -> io::Result<()> + Send>;

/// A writer into the inactive slot.
pub trait SlotSink: Write + Send {
    /// Continue at `offset` bytes into the slot.
    fn seek_to(&mut self, offset: u64) -> io::Result<()>;
    /// Flush everything written so far to stable storage.
    fn sync(&mut self) -> io::Result<()>;
    /// Starts writing slot bytes `[offset, offset + len)` out to the medium without waiting, so
    /// the device works while the stream goes on and later syncs find little left to do.
    fn start_writeback(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// A handle for the read-back thread (see [`Flusher`]).
    fn flusher(&self, evict: bool) -> io::Result<Flusher>;
}

/// The A/B slot table and slot contents.
pub trait SlotTable: Send {
    /// Names the disk in messages.
    fn describe(&self) -> String;
    fn slots(&mut self) -> AgentResult<[SlotState; 2]>;
    fn capacity(&mut self, slot: SlotName) -> AgentResult<u64>;
    /// Changes boot attributes in one durable table update.
    fn set_attrs(&mut self, changes: &[(SlotName, SlotAttrs)]) -> AgentResult<()>;
    fn open_writer(&mut self, slot: InactiveSlot) -> AgentResult<Box<dyn SlotSink>>;
    /// Reads the first `len` bytes of a slot (read-back verification).
    fn open_reader(&mut self, slot: SlotName, len: u64) -> AgentResult<Box<dyn Read + Send>>;
    /// Like `open_reader`, but every read comes from the medium itself, bypassing the page
    /// cache (O_DIRECT), so nothing needs evicting first. `None`: no such path here (memory
    /// slots, file systems without O_DIRECT); the caller evicts and uses `open_reader`.
    fn open_medium_reader(
        &mut self,
        _slot: SlotName,
        _len: u64,
    ) -> AgentResult<Option<Box<dyn Read + Send>>> {
        Ok(None)
    }
}

/// Alignment O_DIRECT transfers need (buffer address, file offset, length).
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes whose start is aligned for O_DIRECT; reads into it skip the
/// bounce copy of [`DirectReader`].
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Reads `[base, base + len)` of a disk opened with O_DIRECT. Reads into aligned buffers whose
/// length is a multiple of [`DIRECT_ALIGN`] go straight from the device into them; others go
/// through a bounce buffer.
struct DirectReader {
    file: std::fs::File,
    base: u64,
    pos: u64,
    len: u64,
    /// Bytes the slot extends past `len` (a final read may round up into them).
    room: u64,
    bounce: Option<AlignedBuf>,
}

impl Read for DirectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = (self.len - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let rounded = want.next_multiple_of(DIRECT_ALIGN);
        let at = self.base + self.pos;
        let direct = at.is_multiple_of(DIRECT_ALIGN as u64)
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
            && rounded <= buf.len()
            && (rounded - want) as u64 <= self.room;
        let n = if direct {
            self.file.read_at(&mut buf[..rounded], at)?.min(want)
        } else {
            // Aligned read around the wanted bytes, copied out.
            let start = at - at % DIRECT_ALIGN as u64;
            let skip = (at - start) as usize;
            let size = (skip + want).next_multiple_of(DIRECT_ALIGN).min(1 << 20);
            let bounce = match &mut self.bounce {
                Some(b) if b.len() >= size => b,
                slot => slot.insert(AlignedBuf::new(1 << 20)),
            };
            let got = self.file.read_at(&mut bounce[..size], start)?;
            let n = got.saturating_sub(skip).min(want);
            buf[..n].copy_from_slice(&bounce[skip..skip + n]);
            n
        };
        self.pos += n as u64;
        Ok(n)
    }
}

fn disk_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Disk, e.to_string())
}

/// A real disk: a block device or a disk image file, with a GPT made by the CoreOS scheme.
pub struct GptSlotTable {
    path: PathBuf,
    booted: BootedSlot,
}

impl GptSlotTable {
    /// Checks the disk has a readable slot table.
    pub fn open(path: &Path, booted: BootedSlot) -> AgentResult<Self> {
        SlotDisk::open(path).map_err(disk_err)?;
        Ok(GptSlotTable {
            path: path.to_path_buf(),
            booted,
        })
    }
}

struct GptSink(twinroot_format::gpt::SlotWriter);

impl Write for GptSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl SlotTable for GptSlotTable {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn slots(&mut self) -> AgentResult<[SlotState; 2]> {
        Ok(SlotDisk::open(&self.path).map_err(disk_err)?.slots())
    }

    fn capacity(&mut self, slot: SlotName) -> AgentResult<u64> {
        Ok(SlotDisk::open(&self.path)
            .map_err(disk_err)?
            .slot_extent(slot)
            .len)
    }

    fn set_attrs(&mut self, changes: &[(SlotName, SlotAttrs)]) -> AgentResult<()> {
        SlotDisk::open_rw(&self.path)
            .map_err(disk_err)?
            .set_many(changes)
            .map_err(disk_err)
    }

    fn open_writer(&mut self, slot: InactiveSlot) -> AgentResult<Box<dyn SlotSink>> {
        let disk = SlotDisk::open(&self.path).map_err(disk_err)?;
        let writer = disk
            .slot_writer(slot.name(), Some(self.booted.name()))
            .map_err(disk_err)?;
        Ok(Box::new(SyncingSink {
            inner: GptSink(writer),
            path: self.path.clone(),
            slot_offset: disk.slot_extent(slot.name()).offset,
            disk: std::fs::File::open(&self.path).map_err(|e| {
                AgentError::new(ErrorKind::Disk, format!("{}: {e}", self.path.display()))
            })?,
        }))
    }

    fn open_reader(&mut self, slot: SlotName, len: u64) -> AgentResult<Box<dyn Read + Send>> {
        let disk = SlotDisk::open(&self.path).map_err(disk_err)?;
        Ok(Box::new(disk.slot_reader(slot, len).map_err(disk_err)?))
    }

    fn open_medium_reader(
        &mut self,
        slot: SlotName,
        len: u64,
    ) -> AgentResult<Option<Box<dyn Read + Send>>> {
        use std::os::unix::fs::OpenOptionsExt;
        let extent = SlotDisk::open(&self.path)
            .map_err(disk_err)?
            .slot_extent(slot);
        if len > extent.len || !extent.offset.is_multiple_of(DIRECT_ALIGN as u64) {
            return Ok(None);
        }
        // File systems without O_DIRECT (tmpfs) refuse the open: fall back to evicting.
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&self.path)
        else {
            return Ok(None);
        };
        Ok(Some(Box::new(DirectReader {
            file,
            base: extent.offset,
            pos: 0,
            len,
            room: extent.len - len,
            bounce: None,
        })))
    }
}

/// Adds a durable `sync` to the GPT slot writer: fdatasync through a read-only descriptor of the
/// same disk flushes the writer's dirty pages too (the page cache is per file, not per descriptor).
struct SyncingSink {
    inner: GptSink,
    path: PathBuf,
    /// Byte offset of the slot on the disk.
    slot_offset: u64,
    /// A read-only descriptor of the disk for writeback requests.
    disk: std::fs::File,
}

impl Write for SyncingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl SlotSink for SyncingSink {
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        self.inner.0.seek_to(offset).map_err(io::Error::other)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.disk.sync_data()
    }

    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a descriptor this struct owns; no memory is passed.
        let r = unsafe {
            nix::libc::sync_file_range(
                self.disk.as_raw_fd(),
                (self.slot_offset + offset) as i64,
                len as i64,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn flusher(&self, evict: bool) -> io::Result<Flusher> {
        let file = std::fs::File::open(&self.path)?;
        let base = self.slot_offset;
        Ok(Box::new(move |offset, len| {
            file.sync_data()?;
            if !evict {
                return Ok(());
            }
            nix::fcntl::posix_fadvise(
                &file,
                (base + offset) as i64,
                len as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .map_err(io::Error::from)
        }))
    }
}

/// Two slots held in memory, for unit tests and the fleet simulator.
#[derive(Debug, Clone)]
pub struct MemorySlotTable {
    pub capacity: u64,
    pub attrs: [SlotAttrs; 2],
    pub data: [std::sync::Arc<std::sync::Mutex<Vec<u8>>>; 2],
    /// Number of writers ever opened per slot (tests check the booted slot stays at 0).
    pub writers_opened: [u32; 2],
}

impl MemorySlotTable {
    pub fn new(capacity: u64) -> Self {
        MemorySlotTable {
            capacity,
            attrs: [SlotAttrs::UNBOOTABLE; 2],
            data: Default::default(),
            writers_opened: [0; 2],
        }
    }
}

struct MemorySink {
    data: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pos: u64,
    capacity: u64,
}

impl Write for MemorySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos + buf.len() as u64 > self.capacity {
            return Err(io::Error::other(format!(
                "slot holds {} bytes; refusing to write past its end",
                self.capacity
            )));
        }
        let mut d = self.data.lock().expect("slot lock");
        let end = self.pos as usize + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[self.pos as usize..end].copy_from_slice(buf);
        self.pos = end as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SlotSink for MemorySink {
    fn seek_to(&mut self, offset: u64) -> io::Result<()> {
        self.pos = offset;
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn flusher(&self, _evict: bool) -> io::Result<Flusher> {
        Ok(Box::new(|_, _| Ok(())))
    }
}

/// Reads a memory slot as it is at the time of each read.
struct MemoryReader {
    data: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pos: u64,
    len: u64,
}

impl Read for MemoryReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.data.lock().expect("slot lock");
        let end = self.len.min(self.pos + buf.len() as u64);
        if self.pos >= end {
            return Ok(0);
        }
        let n = (end - self.pos) as usize;
        let start = self.pos as usize;
        let present = d.len().clamp(start, start + n) - start;
        buf[..present].copy_from_slice(&d[start..start + present]);
        buf[present..n].fill(0);
        self.pos = end;
        Ok(n)
    }
}

impl SlotTable for MemorySlotTable {
    fn describe(&self) -> String {
        "memory disk".into()
    }
    fn slots(&mut self) -> AgentResult<[SlotState; 2]> {
        Ok(SlotName::ALL.map(|name| SlotState {
            name,
            attrs: self.attrs[name.index()],
        }))
    }
    fn capacity(&mut self, _slot: SlotName) -> AgentResult<u64> {
        Ok(self.capacity)
    }
    fn set_attrs(&mut self, changes: &[(SlotName, SlotAttrs)]) -> AgentResult<()> {
        for (slot, attrs) in changes {
            self.attrs[slot.index()] = *attrs;
        }
        Ok(())
    }
    fn open_writer(&mut self, slot: InactiveSlot) -> AgentResult<Box<dyn SlotSink>> {
        self.writers_opened[slot.name().index()] += 1;
        Ok(Box::new(MemorySink {
            data: self.data[slot.name().index()].clone(),
            pos: 0,
            capacity: self.capacity,
        }))
    }
    fn open_reader(&mut self, slot: SlotName, len: u64) -> AgentResult<Box<dyn Read + Send>> {
        Ok(Box::new(MemoryReader {
            data: self.data[slot.index()].clone(),
            pos: 0,
            len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinroot_format::gpt::{DiskLayout, create_disk};

    /// The medium reader returns exactly the slot's bytes whatever the caller's buffers: aligned
    /// (straight from the device), odd-sized and unaligned (through the bounce buffer), and a
    /// length that ends inside a block.
    #[test]
    fn medium_reader_reads_the_slot_with_any_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let disk = create_disk(
            &path,
            &DiskLayout {
                slot_size: 4 << 20,
                state_size: 0,
            },
        )
        .unwrap();
        let content: Vec<u8> = (0..3_000_123u32).map(|i| (i % 251) as u8).collect();
        let mut w = disk.slot_writer(SlotName::B, Some(SlotName::A)).unwrap();
        w.write_all(&content).unwrap();
        w.finish().unwrap();
        let mut table = GptSlotTable::open(&path, BootedSlot::new(SlotName::A)).unwrap();
        let len = content.len() as u64;
        let Some(mut r) = table.open_medium_reader(SlotName::B, len).unwrap() else {
            // No O_DIRECT on this file system: the caller falls back to open_reader.
            return;
        };
        let mut got = Vec::new();
        let mut aligned = AlignedBuf::new(1 << 20);
        let mut odd = vec![0u8; 5000];
        for i in 0.. {
            let buf: &mut [u8] = if i % 3 == 2 {
                &mut odd[1..]
            } else {
                &mut aligned
            };
            let n = r.read(buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), content.len());
        assert!(got == content, "medium reader returned other bytes");
    }
}

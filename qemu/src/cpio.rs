//! A minimal writer for the `newc` cpio format, the format the Linux kernel unpacks as an
//! initramfs (uncompressed; the kernel also accepts it compressed, we do not need that).
//!
//! Record layout: the 6-byte magic `070701`, thirteen 8-digit hex fields, the NUL-terminated name
//! padded to a multiple of 4 bytes (counting the 110-byte header), then the data padded to 4.

use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive entry by entry; [`CpioWriter::finish`] writes the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
            rdev: (0, 0),
        }
    }

    /// A directory (`path` without a leading slash, e.g. `lib/modules`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, &[])
    }

    /// A regular file with the given contents.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, data)
    }

    /// A symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// A character device node (e.g. `dev/console`, major 5 minor 1).
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.rdev = (major, minor);
        let result = self.entry(path, S_IFCHR | (perm & 0o7777), 1, &[]);
        self.rdev = (0, 0);
        result
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        // The kernel does not need more, but many tools expect a 512-byte multiple.
        let pad = (512 - (self.written % 512) as usize) % 512;
        self.out.write_all(&vec![0; pad])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio entry with an empty path",
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: too large for a cpio entry"),
            )
        })?;
        let ino = if path == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = path.len() as u32 + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so archives are reproducible
            size,
            0, // devmajor
            0, // devminor
            self.rdev.0,
            self.rdev.1,
            namesize,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(path.as_bytes())?;
        self.write(&[0])?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_name_are_padded_to_four_bytes() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"abc").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..6], b"070701");
        // 110-byte header + "init\0" = 115 -> padded to 116, then 3 data bytes -> 120.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..119], b"abc");
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 512, 0);
    }
}

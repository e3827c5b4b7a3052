//! A minimal writer of `newc` cpio archives, the format the Linux kernel unpacks as an
//! initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Written by hand (≈60 lines) rather than by running `cpio` over a staging directory
//! because the archive needs device nodes (`/dev/console`, `/dev/null`): creating them
//! with `mknod` needs privileges and a filesystem that allows nodes, while an archive entry
//! is just a header. Entries carry uid/gid 0 and mtime 0 so the same inputs always give
//! the same bytes (the image cache is keyed by a hash of its inputs).

use std::collections::BTreeSet;
use std::io::{self, Write};

/// File type bits of `st_mode`.
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive entry by entry; [`CpioWriter::finish`] adds the trailer.
///
/// Parent directories are not created implicitly by the kernel's unpacker, so
/// [`CpioWriter::file`] and friends add missing parents first.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its missing parents).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, 0, 0, &[])
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), 1, 0, 0, data)
    }

    /// Adds a symbolic link `path` → `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, 1, 0, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, major, minor, &[])
    }

    /// Writes the `TRAILER!!!` entry and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, 0, 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev_major: u32,
        rdev_minor: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::other(format!(
                "{name}: larger than 4 GiB, cpio newc cannot hold it"
            ))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        // Header: magic, then 13 fields of 8 hex digits each; namesize counts the NUL.
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            namesize = name.len() + 1,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses an archive back (name, mode, rdevmajor, rdevminor, data), checking alignment.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0, "entry not 4-aligned");
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_start = (off + 110 + namesize).div_ceil(4) * 4 - off;
            let data = b[data_start..data_start + size].to_vec();
            let next = (off + data_start + size).div_ceil(4) * 4 - off;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn archive_round_trips_with_parents_devices_and_links() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/bin/tern-load", 0o755, b"ELF...").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("bin", 0o755).unwrap(); // already there: no duplicate entry
        let bytes = w.finish().unwrap();
        let entries = parse(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/tern-load", "dev", "dev/console", "bin/sh"]
        );
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[1].4, b"ELF...");
        assert_eq!(
            (entries[3].1, entries[3].2, entries[3].3),
            (S_IFCHR | 0o600, 5, 1)
        );
        assert_eq!(
            (entries[4].1, entries[4].4.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
    }

    #[test]
    fn same_input_gives_same_bytes() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}

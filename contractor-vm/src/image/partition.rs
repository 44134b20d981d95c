//! The partitions of a raw disk image, read from its GPT or MBR partition table, and what
//! file system each one holds, told by its magic number.
//!
//! The disk is a user's file (a cloud image from anywhere): every offset, count and size in
//! it is checked against the disk's length and against the limits below before it is used.
//! - GPT: the header at LBA 1 with 512- or 4096-byte sectors; at most [`MAX_GPT_ENTRIES`]
//!   entries of 128 to 4096 bytes each. The header's CRCs are not checked: a table that
//!   points outside the disk is refused, one that does not is only read.
//! - MBR: the four primary entries, and the logical partitions of an extended one, at most
//!   [`MAX_LOGICAL`] of them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The most GPT entries read (the specification's usual table has 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;
/// The most logical partitions followed in an MBR's extended partition.
pub const MAX_LOGICAL: usize = 64;

/// One partition: its number as Linux numbers it (`vda<number>`), where it lies in bytes,
/// and its type as the table names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers it (logical MBR partitions from 5).
    pub number: u32,
    /// Offset of its first byte on the disk.
    pub start: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Its type, as words when known (`EFI System`), else the GUID or MBR type byte.
    pub kind: String,
}

/// What a disk holds at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A file system on the whole disk, no partition table.
    WholeDisk,
    /// A partition table ("GPT" or "MBR") and its partitions.
    Table {
        /// "GPT" or "MBR".
        scheme: &'static str,
        /// Its partitions, in table order.
        partitions: Vec<Partition>,
    },
}

/// What is wrong with a partition table.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The disk could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The disk.
        path: String,
        /// Why: said in the message, and so not a `#[source]` (a printed chain would say
        /// it twice).
        error: std::io::Error,
    },
    /// Neither a file system nor a partition table at the start.
    #[error(
        "{0} has neither a partition table (GPT or MBR) nor an ext2/3/4 file system at its start"
    )]
    Unknown(String),
    /// A table field out of range.
    #[error("{path}: the {scheme} partition table is damaged: {what}")]
    Damaged {
        /// The disk.
        path: String,
        /// "GPT" or "MBR".
        scheme: &'static str,
        /// What is out of range, with its value.
        what: String,
    },
}

/// A file system, told by its magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSystem {
    /// ext2, ext3 or ext4: what Contractor imports.
    Ext,
    /// Others, named in messages.
    Other(&'static str),
    /// No magic number known here.
    Unknown,
}

impl FileSystem {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            FileSystem::Ext => "ext2/3/4",
            FileSystem::Other(name) => name,
            FileSystem::Unknown => "no file system known here",
        }
    }
}

/// Reads `len` bytes at `offset` of `file`; short reads past the end are zero-filled.
fn read_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < len {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(buf)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// The file system whose magic number is at `offset` of `file`.
pub fn file_system_at(file: &mut File, offset: u64) -> std::io::Result<FileSystem> {
    let head = read_at(file, offset, 0x10048)?;
    Ok(if head[1080..1082] == [0x53, 0xEF] {
        FileSystem::Ext
    } else if &head[0x10040..0x10048] == b"_BHRfS_M" {
        FileSystem::Other("btrfs")
    } else if &head[0..4] == b"XFSB" {
        FileSystem::Other("XFS")
    } else if &head[0x218..0x220] == b"LVM2 001" {
        FileSystem::Other("an LVM physical volume")
    } else if &head[0..6] == b"LUKS\xba\xbe" {
        FileSystem::Other("LUKS (encrypted)")
    } else if &head[82..87] == b"FAT32" || &head[54..59] == b"FAT16" || &head[54..59] == b"FAT12" {
        FileSystem::Other("FAT")
    } else if &head[4086..4096] == b"SWAPSPACE2" {
        FileSystem::Other("swap")
    } else {
        FileSystem::Unknown
    })
}

/// The layout of the raw disk `path`.
pub fn read(path: &Path) -> Result<Layout, PartitionError> {
    let shown = path.display().to_string();
    let io = |error| PartitionError::Read {
        path: shown.clone(),
        error,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if file_system_at(&mut file, 0).map_err(io)? == FileSystem::Ext {
        return Ok(Layout::WholeDisk);
    }
    let damaged = |scheme, what: String| PartitionError::Damaged {
        path: shown.clone(),
        scheme,
        what,
    };
    for sector in [512u64, 4096] {
        let header = read_at(&mut file, sector, 512).map_err(io)?;
        if &header[0..8] == b"EFI PART" {
            return gpt(&mut file, len, sector, &header)
                .map_err(|e| match e {
                    Bad::Io(source) => io(source),
                    Bad::Field(what) => damaged("GPT", what),
                })
                .map(|partitions| Layout::Table {
                    scheme: "GPT",
                    partitions,
                });
        }
    }
    let mbr = read_at(&mut file, 0, 512).map_err(io)?;
    if mbr[510..512] == [0x55, 0xAA] {
        return self::mbr(&mut file, len, &mbr)
            .map_err(|e| match e {
                Bad::Io(source) => io(source),
                Bad::Field(what) => damaged("MBR", what),
            })
            .map(|partitions| Layout::Table {
                scheme: "MBR",
                partitions,
            });
    }
    Err(PartitionError::Unknown(shown))
}

enum Bad {
    Io(std::io::Error),
    Field(String),
}

impl From<std::io::Error> for Bad {
    fn from(err: std::io::Error) -> Bad {
        Bad::Io(err)
    }
}

/// A partition of `first` and `count` sectors of `sector` bytes, checked to lie on a disk
/// of `len` bytes.
fn place(number: u32, first: u64, count: u64, sector: u64, len: u64) -> Result<(u64, u64), Bad> {
    let start = first.checked_mul(sector);
    let size = count.checked_mul(sector);
    match (start, size) {
        (Some(start), Some(size)) if start.checked_add(size).is_some_and(|end| end <= len) => {
            Ok((start, size))
        }
        _ => Err(Bad::Field(format!(
            "partition {number} ({count} sectors from sector {first}) ends past the disk's {len} bytes"
        ))),
    }
}

fn gpt(file: &mut File, len: u64, sector: u64, header: &[u8]) -> Result<Vec<Partition>, Bad> {
    let entries_lba = u64_at(header, 72);
    let count = u32_at(header, 80);
    let entry_size = u32_at(header, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(Bad::Field(format!(
            "it has {count} entries; at most {MAX_GPT_ENTRIES} are read"
        )));
    }
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return Err(Bad::Field(format!(
            "its entries are {entry_size} bytes; 128 to 4096, a multiple of 8, are read"
        )));
    }
    let table_len = u64::from(count) * u64::from(entry_size);
    let table_start = entries_lba
        .checked_mul(sector)
        .filter(|start| start.checked_add(table_len).is_some_and(|end| end <= len))
        .ok_or_else(|| {
            Bad::Field(format!(
                "its entries at sector {entries_lba} lie past the disk's {len} bytes"
            ))
        })?;
    let table = read_at(file, table_start, table_len as usize)?;
    let mut partitions = Vec::new();
    for (i, entry) in table.chunks_exact(entry_size as usize).enumerate() {
        if entry[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        if last < first {
            return Err(Bad::Field(format!(
                "partition {number} ends (sector {last}) before it starts (sector {first})"
            )));
        }
        let (start, size) = place(number, first, last - first + 1, sector, len)?;
        partitions.push(Partition {
            number,
            start,
            size,
            kind: gpt_kind(&entry[0..16]),
        });
    }
    Ok(partitions)
}

/// A GPT type GUID in its usual text form (the first three fields little-endian).
fn guid(bytes: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
        u16::from_le_bytes(bytes[4..6].try_into().expect("2 bytes")),
        u16::from_le_bytes(bytes[6..8].try_into().expect("2 bytes")),
        bytes[8],
        bytes[9],
        bytes[10..16]
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>()
    )
}

fn gpt_kind(type_guid: &[u8]) -> String {
    let text = guid(type_guid);
    let known = match text.as_str() {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        _ => return text,
    };
    known.to_string()
}

fn mbr_kind(kind: u8) -> String {
    match kind {
        0x83 => "Linux".into(),
        0x82 => "Linux swap".into(),
        0x8e => "Linux LVM".into(),
        0xfd => "Linux RAID".into(),
        0xef => "EFI System".into(),
        0x0b | 0x0c => "FAT32".into(),
        0x07 => "NTFS/exFAT".into(),
        other => format!("type 0x{other:02x}"),
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn mbr(file: &mut File, len: u64, sector0: &[u8]) -> Result<Vec<Partition>, Bad> {
    let mut partitions = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let entry = &sector0[446 + 16 * i..446 + 16 * (i + 1)];
        let (kind, first, count) = (
            entry[4],
            u64::from(u32_at(entry, 8)),
            u64::from(u32_at(entry, 12)),
        );
        if kind == 0 || count == 0 {
            continue;
        }
        let number = i as u32 + 1;
        let (start, size) = place(number, first, count, 512, len)?;
        if is_extended(kind) {
            extended = Some(first);
            continue;
        }
        partitions.push(Partition {
            number,
            start,
            size,
            kind: mbr_kind(kind),
        });
    }
    // Each extended boot record holds one logical partition (relative to itself) and the
    // next record (relative to the extended partition's start).
    if let Some(base) = extended {
        let mut record = base;
        for number in 5.. {
            if partitions.len() >= 4 + MAX_LOGICAL {
                return Err(Bad::Field(format!(
                    "its extended partition holds more than {MAX_LOGICAL} logical partitions"
                )));
            }
            let ebr = read_at(file, record * 512, 512)?;
            if ebr[510..512] != [0x55, 0xAA] {
                return Err(Bad::Field(format!(
                    "the extended boot record at sector {record} has no signature"
                )));
            }
            let (kind, first, count) = (
                ebr[446 + 4],
                u64::from(u32_at(&ebr, 446 + 8)),
                u64::from(u32_at(&ebr, 446 + 12)),
            );
            if kind != 0 && count != 0 {
                let (start, size) = place(number, record + first, count, 512, len)?;
                partitions.push(Partition {
                    number,
                    start,
                    size,
                    kind: mbr_kind(kind),
                });
            }
            let next = u64::from(u32_at(&ebr, 462 + 8));
            if ebr[462 + 4] == 0 || next == 0 {
                break;
            }
            record = base + next;
        }
    }
    Ok(partitions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A disk of `len` bytes with `writes` (offset, bytes) in it.
    fn disk(len: u64, writes: &[(u64, &[u8])]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(len).expect("size");
        for (offset, bytes) in writes {
            file.seek(SeekFrom::Start(*offset)).expect("seek");
            file.write_all(bytes).expect("write");
        }
        file
    }

    fn mbr_entry(kind: u8, first: u32, count: u32) -> [u8; 16] {
        let mut entry = [0u8; 16];
        entry[4] = kind;
        entry[8..12].copy_from_slice(&first.to_le_bytes());
        entry[12..16].copy_from_slice(&count.to_le_bytes());
        entry
    }

    #[test]
    fn an_ext_file_system_on_the_whole_disk_has_no_table() {
        let file = disk(1 << 20, &[(1080, &[0x53, 0xEF])]);
        assert_eq!(read(file.path()).expect("layout"), Layout::WholeDisk);
    }

    #[test]
    fn mbr_primary_and_logical_partitions_are_read_with_linux_numbers() {
        let len = 64 << 20;
        let primary = mbr_entry(0x83, 2048, 8192);
        let extended = mbr_entry(0x05, 20480, 40960);
        // The first logical partition starts 2048 sectors into its record; the link points
        // to the next record, 20480 sectors into the extended partition.
        let logical = mbr_entry(0x83, 2048, 4096);
        let link = mbr_entry(0x05, 20480, 8192);
        let second = mbr_entry(0x82, 2048, 2048);
        let file = disk(
            len,
            &[
                (446, &primary),
                (462, &extended),
                (510, &[0x55, 0xAA]),
                (20480 * 512 + 446, &logical),
                (20480 * 512 + 462, &link),
                (20480 * 512 + 510, &[0x55, 0xAA]),
                (40960 * 512 + 446, &second),
                (40960 * 512 + 510, &[0x55, 0xAA]),
            ],
        );
        let Layout::Table { scheme, partitions } = read(file.path()).expect("layout") else {
            panic!("no table");
        };
        assert_eq!(scheme, "MBR");
        let seen: Vec<(u32, u64, u64, &str)> = partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512, p.kind.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, 2048, 8192, "Linux"),
                (5, 22528, 4096, "Linux"),
                (6, 43008, 2048, "Linux swap"),
            ]
        );
    }

    #[test]
    fn a_table_pointing_past_the_disk_is_refused_naming_the_partition() {
        let entry = mbr_entry(0x83, 2048, 1 << 30);
        let file = disk(1 << 20, &[(446, &entry), (510, &[0x55, 0xAA])]);
        let err = read(file.path()).expect_err("past the end").to_string();
        assert!(err.contains("partition 1"), "{err}");
        assert!(err.contains("past the disk's 1048576 bytes"), "{err}");
    }

    #[test]
    fn a_looping_extended_partition_is_cut_at_the_limit() {
        let extended = mbr_entry(0x05, 2048, 4096);
        let logical = mbr_entry(0x83, 1, 1);
        let back = mbr_entry(0x05, 0, 4096);
        let link_to_self = {
            // "next" relative to the extended start: 0 ends the chain, so point at itself
            // through a record one sector further that points back.
            let mut e = back;
            e[8..12].copy_from_slice(&1u32.to_le_bytes());
            e
        };
        let file = disk(
            8 << 20,
            &[
                (446, &extended),
                (510, &[0x55, 0xAA]),
                (2048 * 512 + 446, &logical),
                (2048 * 512 + 462, &link_to_self),
                (2048 * 512 + 510, &[0x55, 0xAA]),
                (2049 * 512 + 446, &logical),
                (2049 * 512 + 462, &link_to_self),
                (2049 * 512 + 510, &[0x55, 0xAA]),
            ],
        );
        let err = read(file.path()).expect_err("a loop").to_string();
        assert!(err.contains("more than 64 logical partitions"), "{err}");
    }

    #[test]
    fn gpt_entries_beyond_the_limit_are_refused() {
        let mut header = [0u8; 92];
        header[0..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&(MAX_GPT_ENTRIES + 1).to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let file = disk(1 << 20, &[(512, &header)]);
        let err = read(file.path()).expect_err("too many").to_string();
        assert!(err.contains("1025 entries; at most 1024"), "{err}");
    }

    #[test]
    fn guids_are_written_as_tools_write_them() {
        // The EFI System type as it is stored on disk.
        let stored = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid(&stored), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(gpt_kind(&stored), "EFI System");
    }

    #[test]
    fn a_disk_of_neither_is_named() {
        let file = disk(1 << 20, &[]);
        let err = read(file.path()).expect_err("nothing").to_string();
        assert!(err.contains("neither a partition table"), "{err}");
    }
}

//! Small files replaced whole (snapshots, checkpoints): `magic (8) | CRC32C of the body (4) |
//! body`, written to a temporary file, `fdatasync`ed, renamed over the old one, and the
//! directory synced — so a reader finds the old file or the new one, never a mix.

use std::path::Path;

use crate::storage::{Storage, read_exact_at, write_all_at};

/// Replaces `path` (in `folder`, created if needed) with `magic`, the checksum and `body`.
pub(crate) fn replace(
    storage: &dyn Storage,
    folder: &Path,
    path: &Path,
    magic: &[u8; 8],
    body: &[u8],
) -> std::io::Result<()> {
    storage.create_dir_all(folder)?;
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    let temporary = path.with_extension("tmp");
    let file = storage.open(&temporary, true)?;
    file.set_len(0)?;
    write_all_at(&*file, &bytes, 0)?;
    file.sync_data()?;
    storage.rename(&temporary, path)?;
    storage.sync_dir(folder)
}

/// Why a small file could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(std::io::Error),
    /// The file is there but not a valid one: the reason.
    Corrupt(&'static str),
}

/// The body of `path`, checked against `magic` and the checksum; `None` when there is no such
/// file; at most `bytes_max` bytes are read.
pub(crate) fn read(
    storage: &dyn Storage,
    path: &Path,
    magic: &[u8; 8],
    bytes_max: u64,
) -> Result<Option<Vec<u8>>, ReadError> {
    let file = match storage.open(path, false) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(ReadError::Io(error)),
    };
    let len = file.size_bytes().map_err(ReadError::Io)?;
    if len > bytes_max {
        return Err(ReadError::Corrupt("too large"));
    }
    let mut bytes = vec![0_u8; usize::try_from(len).map_err(|_| ReadError::Corrupt("too large"))?];
    read_exact_at(&*file, &mut bytes, 0).map_err(ReadError::Io)?;
    if bytes.len() < 12 || bytes[..8] != magic[..] {
        return Err(ReadError::Corrupt("bad magic"));
    }
    let stored_crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if crc32c::crc32c(&bytes[12..]) != stored_crc {
        return Err(ReadError::Corrupt("checksum mismatch"));
    }
    bytes.drain(..12);
    Ok(Some(bytes))
}

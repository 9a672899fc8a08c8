//! [`FaultyStorage`]: an in-memory file system that remembers what was synced and can fail on
//! purpose. It drives the failure tests of `docs/design/log-format.md`: a failed `fdatasync`,
//! short writes, a full disk, and crash images (what a disk could hold after power loss).

use std::{
    any::Any,
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use crate::storage::{Storage, StorageFile};

/// What a crash leaves of the bytes written after the last `fdatasync` of each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    /// Nothing of them.
    Nothing,
    /// All of them (the writes reached the disk, the sync did not happen).
    Everything,
    /// The first `n` of them (an interrupted write).
    Prefix(usize),
    /// The first `n` of them, then zeros up to the unsynced length (a file system that
    /// extended the file but lost the data).
    PrefixThenZeros(usize),
}

#[derive(Debug, Default, Clone)]
struct FileState {
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, FileState>,
    dirs: BTreeSet<PathBuf>,
    /// Names whose creation (or removal) was made durable by a directory sync.
    durable_names: BTreeSet<PathBuf>,
    syncs_ok_before_failure: Option<u64>,
    short_writes: bool,
    space_bytes_max: Option<u64>,
    bytes_used: u64,
    sync_calls: u64,
}

/// An in-memory [`Storage`] with fault injection. Clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct FaultyStorage {
    state: Arc<Mutex<State>>,
}

impl FaultyStorage {
    /// An empty file system without faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets `n` more `fdatasync` calls succeed, then fails every later one.
    pub fn fail_syncs_after(&self, n: u64) {
        self.lock().syncs_ok_before_failure = Some(n);
    }

    /// Makes every write write at most half its bytes (at least one).
    pub fn set_short_writes(&self, short: bool) {
        self.lock().short_writes = short;
    }

    /// Limits the total bytes of all files; writes past it fail with `ENOSPC`.
    pub fn set_space_bytes_max(&self, max: Option<u64>) {
        self.lock().space_bytes_max = max;
    }

    /// How many `fdatasync` calls were made.
    pub fn sync_calls(&self) -> u64 {
        self.lock().sync_calls
    }

    /// The file system a power loss now could leave: synced bytes of every file whose name was
    /// made durable, plus what `torn` says of the unsynced bytes. The image has no faults set.
    pub fn crash_image(&self, torn: Torn) -> FaultyStorage {
        let state = self.lock();
        let mut files = BTreeMap::new();
        let mut used = 0;
        for (path, file) in &state.files {
            if !state.durable_names.contains(path) {
                continue;
            }
            let mut data = file.synced.clone();
            if file.data.len() > data.len() || file.data[..data.len()] != data[..] {
                let unsynced = &file.data[data.len().min(file.data.len())..];
                match torn {
                    Torn::Nothing => {}
                    Torn::Everything => data = file.data.clone(),
                    Torn::Prefix(n) => data.extend_from_slice(&unsynced[..n.min(unsynced.len())]),
                    Torn::PrefixThenZeros(n) => {
                        let n = n.min(unsynced.len());
                        data.extend_from_slice(&unsynced[..n]);
                        data.resize(data.len() + unsynced.len() - n, 0);
                    }
                }
            }
            used += data.len() as u64;
            files.insert(
                path.clone(),
                FileState {
                    synced: data.clone(),
                    data,
                },
            );
        }
        FaultyStorage {
            state: Arc::new(Mutex::new(State {
                durable_names: files.keys().cloned().collect(),
                files,
                dirs: state.dirs.clone(),
                bytes_used: used,
                ..State::default()
            })),
        }
    }

    /// Overwrites bytes of a file as if the disk had put them there (both the synced and the
    /// current copy), creating the file (durably named) when it does not exist.
    pub fn corrupt(&self, path: &Path, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        state.durable_names.insert(path.to_path_buf());
        let file = state.files.entry(path.to_path_buf()).or_default();
        let before = file.data.len();
        for copy in [&mut file.data, &mut file.synced] {
            if copy.len() < offset + bytes.len() {
                copy.resize(offset + bytes.len(), 0);
            }
            copy[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        let grown = (file.data.len() - before) as u64;
        state.bytes_used += grown;
        Ok(())
    }

    /// The current contents of a file.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.lock().files.get(path).map(|f| f.data.clone())
    }
}

#[derive(Debug)]
struct FaultyFile {
    storage: FaultyStorage,
    path: PathBuf,
}

impl FaultyFile {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.storage.lock();
        if !state.files.contains_key(&self.path) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "file was removed"));
        }
        f(&mut state)
    }
}

impl StorageFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|state| {
            let data = &state.files[&self.path].data;
            let start = (offset as usize).min(data.len());
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.with(|state| {
            let mut n = buf.len();
            if state.short_writes && n > 1 {
                n /= 2;
            }
            let end = offset as usize + n;
            let len = state.files[&self.path].data.len();
            let growth = end.saturating_sub(len) as u64;
            if let Some(max) = state.space_bytes_max {
                let free = max.saturating_sub(state.bytes_used);
                if growth > free {
                    let fits = (len as u64 + free).saturating_sub(offset) as usize;
                    if fits == 0 {
                        return Err(io::Error::from_raw_os_error(28)); // ENOSPC
                    }
                    n = n.min(fits);
                }
            }
            let end = offset as usize + n;
            let file = state
                .files
                .get_mut(&self.path)
                .ok_or(io::ErrorKind::NotFound)?;
            let before = file.data.len();
            if file.data.len() < end {
                file.data.resize(end, 0);
            }
            file.data[offset as usize..end].copy_from_slice(&buf[..n]);
            let grown = (file.data.len() - before) as u64;
            state.bytes_used += grown;
            Ok(n)
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|state| {
            state.sync_calls += 1;
            if let Some(left) = state.syncs_ok_before_failure.as_mut() {
                if *left == 0 {
                    return Err(io::Error::other("injected fdatasync failure"));
                }
                *left -= 1;
            }
            let file = state
                .files
                .get_mut(&self.path)
                .ok_or(io::ErrorKind::NotFound)?;
            file.synced = file.data.clone();
            Ok(())
        })
    }

    fn size_bytes(&self) -> io::Result<u64> {
        self.with(|state| Ok(state.files[&self.path].data.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|state| {
            let file = state
                .files
                .get_mut(&self.path)
                .ok_or(io::ErrorKind::NotFound)?;
            let before = file.data.len() as u64;
            file.data.resize(len as usize, 0);
            state.bytes_used = (state.bytes_used + len).saturating_sub(before);
            Ok(())
        })
    }
}

impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        for ancestor in dir.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        if !state.dirs.contains(dir) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        Ok(state
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock();
        if !state.files.contains_key(path) {
            if !create {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such file"));
            }
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            if !state.dirs.contains(&parent) {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
            }
            state.files.insert(path.to_path_buf(), FileState::default());
        }
        Ok(Arc::new(FaultyFile {
            storage: self.clone(),
            path: path.to_path_buf(),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let file = state
            .files
            .remove(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        state.bytes_used = state.bytes_used.saturating_sub(file.data.len() as u64);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let file = state
            .files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
        if let Some(old) = state.files.insert(to.to_path_buf(), file) {
            state.bytes_used = state.bytes_used.saturating_sub(old.data.len() as u64);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let present: Vec<PathBuf> = state
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        state.durable_names.retain(|p| p.parent() != Some(dir));
        state.durable_names.extend(present);
        Ok(())
    }

    fn lock(&self, _path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        Ok(Box::new(()))
    }
}

//! Keyed state beyond memory: the process's embedded store and the memory
//! bound its users share.
//!
//! With `taskmanager.stateMemory` set, a process opens one [`StateStore`]:
//! an LSM (fjall, ADR 0010) in a local directory that is wiped at start —
//! its content is always rebuilt from checkpoints, so it needs no
//! durability of its own. Window operators keep each window in a keyspace
//! of their own and hold recently used keys in a cache; all caches of the
//! process charge one budget, and an operator that finds the budget
//! exceeded writes its cache back and empties it. The caches get 3/8 of
//! the bound (charged at their capacity), the store's block cache 1/8,
//! its memtables about a fifth (each keyspace's up to 2/32 of the bound
//! before it is sealed, with at most four sealed ones waiting for a
//! flush); the rest is for the filter and index blocks kept in memory,
//! which grow with the state on disk (a few percent of it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch as WriteBatch, Snapshot};

/// The process's state store.
pub struct StateStore {
    db: Database,
    dir: PathBuf,
    memory: u64,
    /// Bytes the operators' caches may hold together.
    cache_limit: u64,
    cached: AtomicI64,
    memtable: u64,
    next: AtomicU64,
    /// Cache write-backs forced by the budget.
    evictions: AtomicU64,
    /// Snapshots open, and bytes written while any was (see [`Self::commit`]).
    pins: std::sync::Mutex<Pins>,
    unpinned: std::sync::Condvar,
}

#[derive(Default)]
struct Pins {
    open: usize,
    written: u64,
    stalled: bool,
}

/// A consistent view of the store (a fjall snapshot) that the store
/// knows is open: while it is, memtables written since stay in memory.
pub struct StoreSnapshot {
    snap: Snapshot,
    store: Arc<StateStore>,
}

impl std::ops::Deref for StoreSnapshot {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snap
    }
}

impl Drop for StoreSnapshot {
    fn drop(&mut self) {
        let mut p = self.store.pins.lock().unwrap_or_else(|p| p.into_inner());
        p.open = p.open.saturating_sub(1);
        if p.open == 0 {
            p.written = 0;
            self.store.unpinned.notify_all();
        }
    }
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("dir", &self.dir)
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

/// Where in the state dir the store keeps its files, and where large
/// snapshots and restored files are written on their way to and from the
/// checkpoint store.
const DB_DIR: &str = "db";
const SPOOL_DIR: &str = "spool";

impl StateStore {
    /// Opens a store in `dir` (emptied first) bounded to `memory` bytes.
    pub fn open(dir: &Path, memory: u64) -> Result<Arc<Self>, String> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| {
                format!(
                    "cannot empty the state directory {} (taskmanager.stateDir): {e}",
                    dir.display()
                )
            })?;
        }
        for sub in [dir.join(DB_DIR), dir.join(SPOOL_DIR)] {
            std::fs::create_dir_all(&sub).map_err(|e| {
                format!(
                    "cannot create the state directory {} (taskmanager.stateDir): {e}",
                    sub.display()
                )
            })?;
        }
        let db = Database::builder(dir.join(DB_DIR))
            .cache_size((memory / 8).max(1 << 20))
            // Nothing here must survive a crash: never wait for the disk.
            .manual_journal_persist(true)
            // One background worker: a second one made records slower on
            // two cores (it compacts more eagerly) and saved no memory.
            .worker_threads(1)
            .temporary(true)
            .open()
            .map_err(|e| {
                format!(
                    "cannot open the state store in {} (taskmanager.stateDir): {e}",
                    dir.display()
                )
            })?;
        Ok(Arc::new(Self {
            db,
            dir: dir.to_path_buf(),
            memory,
            cache_limit: memory * 3 / 8,
            cached: AtomicI64::new(0),
            memtable: (memory / 32).clamp(1 << 20, 32 << 20),
            next: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            pins: Default::default(),
            unpinned: Default::default(),
        }))
    }

    /// Where large state files pass through on their way to and from the
    /// checkpoint store (emptied with the store at start).
    pub fn spool(&self) -> PathBuf {
        self.dir.join(SPOOL_DIR)
    }

    /// A new, empty keyspace (one per window of an operator instance).
    pub fn keyspace(&self) -> Result<Keyspace, String> {
        let name = format!("w{}", self.next.fetch_add(1, Ordering::Relaxed));
        let memtable = self.memtable;
        self.db
            .keyspace(&name, || {
                // Filter and index blocks stay in memory (about 2 bytes
                // per entry): a key not cached then costs one data block
                // read, and a new key none — not a filter block read and
                // checksummed from disk on every lookup once the block
                // cache is small next to the state.
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable)
                    .manual_journal_persist(true)
                    .filter_block_pinning_policy(PinningPolicy::all(true))
                    .index_block_pinning_policy(PinningPolicy::all(true))
            })
            .map_err(|e| self.failed("creating a keyspace", e))
    }

    /// Drops a keyspace and its files (a purged window).
    pub fn drop_keyspace(&self, ks: Keyspace) {
        if let Err(e) = self.db.delete_keyspace(ks) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "dropping a window's keyspace failed; its files stay until the TaskManager restarts");
        }
    }

    /// A consistent view of every keyspace as of now.
    pub fn snapshot(self: &Arc<Self>) -> StoreSnapshot {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).open += 1;
        StoreSnapshot {
            snap: self.db.snapshot(),
            store: self.clone(),
        }
    }

    /// A batch of writes, applied at once by [`Self::commit`].
    pub fn batch(&self) -> WriteBatch {
        self.db.batch()
    }

    /// Applies `batch` of about `bytes`. While a snapshot is open (being
    /// encoded for a checkpoint), the store keeps every memtable written
    /// since in memory, flushed or not (fjall frees a table version only
    /// once no snapshot may read it): once writes during it pass the
    /// write buffers' share of the bound, the writer waits for the
    /// snapshot to close.
    pub fn commit(&self, batch: WriteBatch, bytes: usize) -> Result<(), String> {
        {
            let mut p = self.pins.lock().unwrap_or_else(|p| p.into_inner());
            if p.open > 0 {
                p.written += bytes as u64;
                while p.open > 0 && p.written > self.memory / 4 {
                    if !p.stalled {
                        p.stalled = true;
                        tracing::info!(
                            memory_mib = self.memory >> 20,
                            "window state writes wait for a checkpoint's snapshot to be encoded (taskmanager.stateMemory bounds what a snapshot may hold in memory); said once"
                        );
                    }
                    p = self
                        .unpinned
                        .wait_timeout(p, std::time::Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        batch
            .commit()
            .map_err(|e| self.failed("writing window state", e))
    }

    /// Bytes of writes to commit at once: a write-back larger than this
    /// goes in several batches, each followed by [`Self::wrote`].
    pub fn batch_bytes(&self) -> usize {
        (self.memtable / 2) as usize
    }

    /// After a batch into `ks`: seals its memtable once the write buffers
    /// of the store outgrow their share, rather than waiting for the
    /// workers to get round to it (fjall itself then holds writers back
    /// while four sealed memtables wait to be flushed).
    pub fn wrote(&self, ks: &Keyspace) -> Result<(), String> {
        if self.db.write_buffer_size() > self.memtable * 2 {
            ks.rotate_memtable()
                .map_err(|e| self.failed("sealing a memtable", e))?;
        }
        Ok(())
    }

    /// Adds `delta` bytes to what the caches hold.
    pub fn charge(&self, delta: i64) {
        self.cached.fetch_add(delta, Ordering::Relaxed);
    }

    /// Whether the caches hold more than their share of the bound.
    pub fn over_budget(&self) -> bool {
        self.cached.load(Ordering::Relaxed) > self.cache_limit as i64
    }

    /// Counts a cache written back because the budget was exceeded.
    pub fn evicted(&self) {
        if self.evictions.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::info!(
                memory_mib = self.memory >> 20,
                dir = %self.dir.display(),
                "window caches reached their bound (taskmanager.stateMemory): keys not cached are read from the state store from now on"
            );
        }
    }

    /// Bytes in the store's memtables (active and waiting to be flushed).
    pub fn write_buffer_bytes(&self) -> u64 {
        self.db.write_buffer_size()
    }

    /// (bytes the caches hold, their limit, evictions so far, bytes on disk).
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        (
            self.cached.load(Ordering::Relaxed).max(0) as u64,
            self.cache_limit,
            self.evictions.load(Ordering::Relaxed),
            self.db.disk_space().unwrap_or(0),
        )
    }

    /// The bound it was opened with.
    pub fn memory(&self) -> u64 {
        self.memory
    }

    /// An error of the store as a task failure: what failed, where, and what
    /// to look at.
    pub fn failed(&self, what: &str, e: impl std::fmt::Display) -> String {
        format!(
            "{what} in the state store ({}) failed: {e}; check that the disk of taskmanager.stateDir has space and works",
            self.dir.display()
        )
    }
}

static PROCESS: OnceLock<Arc<StateStore>> = OnceLock::new();

/// Opens the process's store (once; later calls keep the first).
pub fn configure(dir: &Path, memory: u64) -> Result<Arc<StateStore>, String> {
    if let Some(s) = PROCESS.get() {
        return Ok(s.clone());
    }
    let store = StateStore::open(dir, memory)?;
    let store = PROCESS.get_or_init(|| store).clone();
    few_malloc_arenas();
    // Large restored files pass through the state dir too, not memory.
    ferry_core::manifest::set_spool_dir(Some(store.spool()));
    Ok(store)
}

/// Limits glibc's malloc to two arenas (unless `MALLOC_ARENA_MAX` says
/// otherwise): with one per thread, as many as eight per core, memory
/// freed in one arena is not reused by another, and a process whose state
/// memory is bounded grew to half again its bound in a 2 GB state job
/// (`ferry bench large-state`; two arenas kept it flat).
fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tuning parameter of the allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Opens the process's store when `memory` is set, in `dir` or else in
/// [`default_dir`]`(name)`, and says so in the log.
pub fn configure_from(
    memory: Option<u64>,
    dir: Option<&Path>,
    name: &str,
) -> Result<Option<Arc<StateStore>>, String> {
    let Some(memory) = memory else {
        return Ok(None);
    };
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_dir(name));
    let store = configure(&dir, memory)?;
    tracing::info!(
        dir = %dir.display(),
        memory_mib = memory >> 20,
        "window state lives in the local state store, its caches bounded"
    );
    Ok(Some(store))
}

/// The process's store, when `taskmanager.stateMemory` is set.
pub fn process_store() -> Option<Arc<StateStore>> {
    PROCESS.get().cloned()
}

/// Where a process keeps its store unless told: `<temp dir>/ferry-state/<name>`.
pub fn default_dir(name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::env::temp_dir().join("ferry-state").join(safe)
}

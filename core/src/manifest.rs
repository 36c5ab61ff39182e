//! Checkpoint layout and `MANIFEST.json`: the one file that makes a
//! checkpoint exist.
//!
//! ```text
//! <root>/jobs/<job-id>/spec.yaml
//! <root>/jobs/<job-id>/checkpoints/<n>/<operator>-<subtask>.state
//! <root>/jobs/<job-id>/checkpoints/<n>/MANIFEST.json   <- written last, create-only
//! <root>/jobs/<job-id>/savepoints/savepoint-<n>/...    <- same layout
//! <root>/jobs/<job-id>/shared/<operator>-<subtask>-<sha256>.state
//! ```
//!
//! With incremental checkpoints (`checkpointing.incremental`) an operator
//! subtask's state is a *chain*: a full snapshot and the deltas written
//! after it, each a file under the job's `shared/` folder named by its
//! content, which later checkpoints list again instead of writing anew. A
//! manifest lists every file it needs (its [`FileEntry::chain`] gives the
//! order); retention removes a shared file only once no retained manifest
//! lists it. Savepoints are always full and self-contained.
//!
//! Checkpoints and savepoints share one numbering; every path of this
//! layout is built by the functions below ([`snapshot_dir`] and friends),
//! nowhere else.
//!
//! Invariant: every path in a manifest is relative to its checkpoint
//! directory, and a manifest is only written after every file it lists is
//! durable, so a checkpoint copied elsewhere restores unchanged and a
//! directory without a manifest is ignored.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::ids::{CheckpointId, JobId};
use crate::storage::{StorageLocation, sha256_hex};

/// File name of a manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// Manifest format of a snapshot whose files all lie in its own directory
/// (every snapshot before incremental checkpoints).
pub const MANIFEST_FORMAT: u32 = 1;
/// Manifest format of a snapshot that lists shared files (incremental
/// checkpoints): builds that know only format 1 refuse it by number
/// instead of missing its files.
pub const MANIFEST_FORMAT_SHARED: u32 = 2;

/// Folder of a job's shared state files, relative to its job directory.
pub const SHARED_DIR: &str = "shared";

/// Relative path of a job's shared folder below the storage root.
pub fn shared_dir(job: &JobId) -> String {
    format!("jobs/{job}/{SHARED_DIR}")
}

/// Path, relative to the job directory, of a shared state file: named by
/// its content, so a name never stands for two different files (a copy in
/// another region, or a retried upload, is the same file).
pub fn shared_file(operator: &str, subtask: u32, sha256: &str) -> String {
    format!("{SHARED_DIR}/{operator}-{subtask}-{sha256}.state")
}

/// Relative path of a job's directory below the storage root.
pub fn job_dir(job: &JobId) -> String {
    format!("jobs/{job}")
}

/// Relative path of checkpoint `n` of a job below the storage root.
pub fn checkpoint_dir(job: &JobId, n: CheckpointId) -> String {
    format!("jobs/{job}/checkpoints/{n}")
}

/// Relative path of the checkpoints folder of a job.
pub fn checkpoints_root(job: &JobId) -> String {
    format!("jobs/{job}/checkpoints")
}

/// Relative path of the savepoints folder of a job.
pub fn savepoints_root(job: &JobId) -> String {
    format!("jobs/{job}/savepoints")
}

/// Relative path of a named savepoint of a job (a directory listed under
/// [`savepoints_root`]).
pub fn savepoint_dir(job: &JobId, name: &str) -> String {
    format!("{}/{name}", savepoints_root(job))
}

/// Name of the directory of savepoint `n` under [`savepoints_root`].
pub fn savepoint_name(n: CheckpointId) -> String {
    format!("savepoint-{n}")
}

/// The number of a savepoint directory named by [`savepoint_name`]; `None`
/// for any other name.
pub fn savepoint_number(name: &str) -> Option<CheckpointId> {
    name.strip_prefix("savepoint-")
        .and_then(|n| n.parse::<u64>().ok())
        .map(CheckpointId)
}

/// Relative path of snapshot `n` of a job: `checkpoints/<n>` for a
/// checkpoint, `savepoints/savepoint-<n>` for a savepoint.
pub fn snapshot_dir(job: &JobId, kind: SnapshotKind, n: CheckpointId) -> String {
    match kind {
        SnapshotKind::Checkpoint => checkpoint_dir(job, n),
        SnapshotKind::Savepoint => savepoint_dir(job, &savepoint_name(n)),
    }
}

/// File name of an operator subtask's state inside a checkpoint directory.
pub fn state_file(operator: &str, subtask: u32) -> String {
    format!("{operator}-{subtask}.state")
}

/// Whether a snapshot is periodic (retained N) or user-owned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    Checkpoint,
    Savepoint,
}

/// One state file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the checkpoint directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub operator: String,
    pub subtask: u32,
    /// The file lies in the job's `shared/` folder and `path` is relative
    /// to the job directory (`shared/...`), not to the checkpoint's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Position in its operator subtask's state chain: 0 is the full
    /// snapshot, 1.. the deltas applied after it, in order.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chain: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl FileEntry {
    /// The file's path relative to the job directory: `checkpoint_rel` is
    /// the snapshot's directory relative to it (e.g. `checkpoints/7`).
    pub fn job_relative(&self, checkpoint_rel: &str) -> String {
        if self.shared {
            self.path.clone()
        } else {
            format!("{checkpoint_rel}/{}", self.path)
        }
    }

    /// Why the path is unsafe to join to a directory (absolute, `..`, or a
    /// shared file outside `shared/`); `None` when it is fine.
    pub fn path_problem(&self) -> Option<String> {
        if self.path.split('/').any(|s| s == ".." || s == ".") || self.path.starts_with('/') {
            return Some(format!("file path '{}' is not relative", self.path));
        }
        if self.shared && !self.path.starts_with(&format!("{SHARED_DIR}/")) {
            return Some(format!(
                "shared file path '{}' is not below {SHARED_DIR}/",
                self.path
            ));
        }
        None
    }
}

/// A sink transaction the checkpoint closed (committed when it completes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkTransaction {
    pub subtask: u32,
    pub txn: String,
    pub records: u64,
}

/// The manifest of one completed checkpoint or savepoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub job_id: JobId,
    pub job_name: String,
    pub checkpoint_id: CheckpointId,
    pub kind: SnapshotKind,
    pub created_at: DateTime<Utc>,
    /// Fencing epoch of the JobManager that completed it (0 in `ferry local`).
    pub jm_epoch: crate::JmEpoch,
    /// Region epoch at completion (0 without cross-region coordination).
    pub region_epoch: crate::RegionEpoch,
    pub parallelism: u32,
    /// Lowest watermark over all tasks when the barrier passed (epoch ms).
    pub watermark: i64,
    pub records_in: u64,
    pub records_out: u64,
    /// True for the final checkpoint of a bounded job.
    pub finished: bool,
    /// Milliseconds from trigger to the last acknowledgement.
    pub duration_ms: u64,
    pub files: Vec<FileEntry>,
    /// Source position per partition (format depends on the source).
    pub source_offsets: BTreeMap<String, serde_json::Value>,
    pub sink_transactions: Vec<SinkTransaction>,
    /// The checkpoint or savepoint the run that completed this one started
    /// from (`None`: it started empty). Every checkpoint of one run carries
    /// the same value, so any of them tells where the run's lineage leaves
    /// the older ones: a region that failed over knows from it which of
    /// the old primary's checkpoints it never restored (fail-back's
    /// divergence report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<u64>,
}

impl Manifest {
    /// Total size of the state files (shared ones included: what a
    /// restore reads).
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Size of the files this snapshot wrote itself: its own directory's,
    /// and the shared files no earlier snapshot of the chain listed (the
    /// newest delta, or a new full snapshot, of each chain).
    pub fn written_size(&self) -> u64 {
        let mut newest: BTreeMap<(&str, u32), &FileEntry> = BTreeMap::new();
        let mut own = 0;
        for f in &self.files {
            if !f.shared {
                own += f.size;
                continue;
            }
            let e = newest.entry((f.operator.as_str(), f.subtask)).or_insert(f);
            if f.chain > e.chain {
                *e = f;
            }
        }
        own + newest.values().map(|f| f.size).sum::<u64>()
    }

    /// Whether any file lies in the shared folder.
    pub fn has_shared(&self) -> bool {
        self.files.iter().any(|f| f.shared)
    }

    /// The manifest format these files need.
    pub fn needed_format(&self) -> u32 {
        if self.has_shared() {
            MANIFEST_FORMAT_SHARED
        } else {
            MANIFEST_FORMAT
        }
    }

    /// The state chain of every subtask of `operator`: subtask → files in
    /// chain order (a single file when it is not incremental).
    pub fn chains(&self, operator: &str) -> BTreeMap<u32, Vec<&FileEntry>> {
        let mut out: BTreeMap<u32, Vec<&FileEntry>> = BTreeMap::new();
        for f in self.files.iter().filter(|f| f.operator == operator) {
            out.entry(f.subtask).or_default().push(f);
        }
        for files in out.values_mut() {
            files.sort_by_key(|f| f.chain);
        }
        out
    }

    /// Checks that each operator subtask's files form one chain (positions
    /// 0..n, once each) and that every path is safe.
    pub fn check_files(&self) -> std::result::Result<(), String> {
        let mut seen: BTreeMap<(&str, u32), Vec<u32>> = BTreeMap::new();
        for f in &self.files {
            if let Some(p) = f.path_problem() {
                return Err(p);
            }
            seen.entry((f.operator.as_str(), f.subtask))
                .or_default()
                .push(f.chain);
        }
        for ((op, sub), mut pos) in seen {
            pos.sort_unstable();
            if pos.iter().enumerate().any(|(i, p)| *p as usize != i) {
                return Err(format!(
                    "the state of '{op}' subtask {sub} is not one chain (positions {pos:?})"
                ));
            }
        }
        Ok(())
    }
}

/// A checkpoint whose manifest and files were read and verified.
#[derive(Clone, Debug)]
pub struct VerifiedCheckpoint {
    pub manifest: Manifest,
    /// Relative path → contents, every hash checked.
    pub files: BTreeMap<String, Bytes>,
}

/// Opens a snapshot directory given by URL or path (`--from-savepoint`) so
/// that the job directory two levels above it — where its shared files
/// lie (`<job>/checkpoints/<n>`, `<job>/savepoints/<name>`) — is reachable
/// from it ([`read_verified`]).
pub fn open_snapshot_dir(url: &str) -> Result<StorageLocation> {
    let trimmed = url.trim_end_matches('/');
    let parsed = StorageLocation::parse(trimmed)?;
    let segments: Vec<&str> = parsed.path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.len() < 3 {
        return StorageLocation::open(trimmed);
    }
    let (head, tail) = segments.split_at(segments.len() - 2);
    let head = if parsed.scheme == "file" {
        // The same spelling: a URL stays a URL (what logs and errors show).
        let scheme = if trimmed.starts_with("file://") {
            "file://"
        } else {
            ""
        };
        format!("{scheme}/{}", head.join("/"))
    } else {
        // The URL minus its last two segments, in the URL's own spelling.
        let mut h = trimmed;
        for _ in 0..2 {
            h = h.rsplit_once('/').map(|(h, _)| h).unwrap_or(h);
        }
        h.to_string()
    };
    Ok(StorageLocation::open(&head)?.child(&tail.join("/")))
}

/// Reads only the manifest of a checkpoint directory (no file is checked).
/// `Ok(None)`: no manifest; a manifest that does not parse is `Corrupt`.
pub async fn read_manifest(dir: &StorageLocation) -> Result<Option<Manifest>> {
    let Some(raw) = dir.get_opt(MANIFEST_FILE).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&raw)
        .map(Some)
        .map_err(|e| CoreError::Corrupt {
            path: format!("{}/{MANIFEST_FILE}", dir.url()),
            reason: format!("unreadable manifest: {e}"),
        })
}

/// Reads a checkpoint directory and verifies every file's size and SHA-256
/// (shared files from the job's `shared/` folder, two levels above `dir`).
/// `Ok(None)` means "no manifest: this checkpoint does not exist".
pub async fn read_verified(dir: &StorageLocation) -> Result<Option<VerifiedCheckpoint>> {
    let Some(raw) = dir.get_opt(MANIFEST_FILE).await? else {
        return Ok(None);
    };
    let corrupt = |reason: String| CoreError::Corrupt {
        path: format!("{}/{MANIFEST_FILE}", dir.url()),
        reason,
    };
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| corrupt(format!("unreadable manifest: {e}")))?;
    check_format(&manifest).map_err(corrupt)?;
    manifest.check_files().map_err(corrupt)?;
    let job_dir = dir.parent().parent();
    // Files are read a few at a time: a large state of many shared files
    // restores at the store's parallel throughput, not one request after
    // the other.
    let reads: Vec<_> = manifest
        .files
        .iter()
        .cloned()
        .map(|f| {
            let loc = if f.shared {
                job_dir.clone()
            } else {
                dir.clone()
            };
            async move {
                let rel = f.path.as_str();
                let path = || format!("{}/{}", loc.url(), rel);
                if f.size > SPOOL_ABOVE
                    && let Some(spool) = spool_dir()
                {
                    let data = read_spooled(&loc, rel, &f, &spool).await?;
                    return Ok((f.path.clone(), data));
                }
                let data = loc.get_opt(rel).await?.ok_or_else(|| CoreError::Corrupt {
                    path: path(),
                    reason: "listed in the manifest but missing".into(),
                })?;
                if data.len() as u64 != f.size {
                    return Err(CoreError::Corrupt {
                        path: path(),
                        reason: format!("size {} but the manifest says {}", data.len(), f.size),
                    });
                }
                let hash = hash_off_thread(data.clone()).await;
                if hash != f.sha256 {
                    return Err(CoreError::Corrupt {
                        path: path(),
                        reason: format!("SHA-256 {hash} but the manifest says {}", f.sha256),
                    });
                }
                Ok((f.path.clone(), data))
            }
        })
        .collect();
    use futures::StreamExt as _;
    let mut files = BTreeMap::new();
    {
        let mut stream = futures::stream::iter(reads).buffered(READ_PARALLELISM);
        while let Some(r) = stream.next().await {
            let (path, data) = r?;
            files.insert(path, data);
        }
    }
    Ok(Some(VerifiedCheckpoint { manifest, files }))
}

/// Files larger than this are read through the spool directory, when one
/// is set ([`set_spool_dir`]).
const SPOOL_ABOVE: u64 = 16 << 20;

static SPOOL_DIR: std::sync::RwLock<Option<std::path::PathBuf>> = std::sync::RwLock::new(None);

/// Makes [`read_verified`] read large state files into files under `dir`
/// (local disk) and map them, instead of holding them in memory: their
/// pages are the page cache's, which the kernel reclaims under pressure.
/// A TaskManager whose state lives on disk sets its state dir's spool.
pub fn set_spool_dir(dir: Option<std::path::PathBuf>) {
    *SPOOL_DIR.write().unwrap_or_else(|p| p.into_inner()) = dir;
}

fn spool_dir() -> Option<std::path::PathBuf> {
    SPOOL_DIR.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Reads `rel` of `loc` into a file in `spool`, checking its size and
/// SHA-256 as it arrives, and maps it.
async fn read_spooled(
    loc: &StorageLocation,
    rel: &str,
    f: &FileEntry,
    spool: &std::path::Path,
) -> Result<Bytes> {
    let path = || format!("{}/{}", loc.url(), rel);
    let local = |e: std::io::Error| {
        CoreError::Other(format!(
            "reading {} through {} (the state dir's spool) failed: {e}",
            path(),
            spool.display()
        ))
    };
    let tmp = tempfile::NamedTempFile::new_in(spool)
        .map_err(local)?
        .into_temp_path();
    let (size, hash) = loc
        .get_to_file(rel, &tmp)
        .await?
        .ok_or_else(|| CoreError::Corrupt {
            path: path(),
            reason: "listed in the manifest but missing".into(),
        })?;
    if size != f.size {
        return Err(CoreError::Corrupt {
            path: path(),
            reason: format!("size {size} but the manifest says {}", f.size),
        });
    }
    if hash != f.sha256 {
        return Err(CoreError::Corrupt {
            path: path(),
            reason: format!("SHA-256 {hash} but the manifest says {}", f.sha256),
        });
    }
    let file = std::fs::File::open(&tmp).map_err(local)?;
    // SAFETY: the file is this process's own temporary file, written
    // above and never written again; it is unlinked right after (the
    // mapping stays valid), so nothing can change it under the map.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(local)?;
    // Read once, front to back: let the kernel read ahead and drop pages
    // behind.
    let _ = map.advise(memmap2::Advice::Sequential);
    drop(tmp);
    Ok(Bytes::from_owner(map))
}

/// How many state files a restore reads at once.
const READ_PARALLELISM: usize = 8;

/// SHA-256 of a large file on a blocking thread (a restore hashes
/// gigabytes; the async workers keep serving meanwhile).
async fn hash_off_thread(data: Bytes) -> String {
    if data.len() < 1 << 20 {
        return sha256_hex(&data);
    }
    match tokio::task::spawn_blocking(move || sha256_hex(&data)).await {
        Ok(h) => h,
        Err(e) => format!("hashing failed: {e}"),
    }
}

/// Refuses a manifest format this build does not read, or one that does
/// not match its files.
pub fn check_format(m: &Manifest) -> std::result::Result<(), String> {
    match m.format {
        MANIFEST_FORMAT if m.has_shared() => Err(format!(
            "manifest format {MANIFEST_FORMAT} cannot list shared files"
        )),
        MANIFEST_FORMAT | MANIFEST_FORMAT_SHARED => Ok(()),
        f => Err(format!(
            "manifest format {f} is not supported by this build (it reads {MANIFEST_FORMAT} and {MANIFEST_FORMAT_SHARED}); restore it with the Ferry version that wrote it"
        )),
    }
}

/// Deletes the files of a job's `shared/` folder that no snapshot of the
/// job lists (checkpoints and savepoints with a manifest) and that were
/// last written before `written_before` (`None`: any). Returns their paths
/// relative to the job directory. A manifest that cannot be read may list
/// anything: then nothing is deleted and that is the error.
///
/// The caller makes sure no snapshot being written now lists a file that
/// is not yet listed anywhere (the JobManager runs it between
/// checkpoints; a replicator, whose copies may be under way, passes a
/// `written_before` well before any copy in flight began).
pub async fn collect_shared(
    root: &StorageLocation,
    job: &JobId,
    written_before: Option<DateTime<Utc>>,
) -> Result<Vec<String>> {
    let files = root.list_files_modified(&shared_dir(job)).await?;
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<String> = list_checkpoint_ids(root, job)
        .await?
        .into_iter()
        .map(|id| checkpoint_dir(job, id))
        .collect();
    for name in root.list_dirs(&savepoints_root(job)).await? {
        dirs.push(savepoint_dir(job, &name));
    }
    let mut listed = std::collections::HashSet::new();
    for dir in dirs {
        if let Some(m) = read_manifest(&root.child(&dir)).await? {
            listed.extend(m.files.into_iter().filter(|f| f.shared).map(|f| f.path));
        }
    }
    let mut removed = Vec::new();
    for (name, _, modified) in files {
        let path = format!("{SHARED_DIR}/{name}");
        if listed.contains(&path) || written_before.is_some_and(|t| modified >= t) {
            continue;
        }
        root.delete(&format!("{}/{path}", job_dir(job))).await?;
        removed.push(path);
    }
    Ok(removed)
}

/// Checkpoint numbers that have a directory under `jobs/<job>/checkpoints`,
/// ascending (with or without a manifest).
pub async fn list_checkpoint_ids(root: &StorageLocation, job: &JobId) -> Result<Vec<CheckpointId>> {
    let mut ids: Vec<CheckpointId> = root
        .list_dirs(&checkpoints_root(job))
        .await?
        .iter()
        .filter_map(|d| d.parse::<u64>().ok().map(CheckpointId))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Outcome of looking for the checkpoint to restore from.
#[derive(Debug)]
pub struct RestoreChoice {
    pub checkpoint: Option<VerifiedCheckpoint>,
    /// Newer checkpoints that were skipped, and why.
    pub skipped: Vec<(CheckpointId, String)>,
    /// How many of `skipped` were complete (had a manifest) but unusable:
    /// corrupt, another job's, or state that does not decode. Their output
    /// may be committed, so starting over instead would repeat it.
    pub damaged: usize,
    /// Highest checkpoint number with a directory (manifest or not).
    pub highest_id: Option<CheckpointId>,
}

impl RestoreChoice {
    /// Nothing to restore although completed checkpoints exist: starting
    /// from the beginning would repeat committed output.
    pub fn all_damaged(&self) -> bool {
        self.checkpoint.is_none() && self.damaged > 0
    }

    /// Every skipped snapshot and why, on one line.
    pub fn skipped_reasons(&self) -> String {
        self.skipped
            .iter()
            .map(|(id, why)| format!("checkpoint {id}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Marker left in the directory of a checkpoint attempt that failed, once
/// its partial files are removed: it keeps the number from being reused.
pub const ABORTED_FILE: &str = "ABORTED";

/// Removes the partial files of a failed checkpoint attempt, leaving only
/// an [`ABORTED_FILE`] marker with `reason`. A directory that has a manifest
/// (the checkpoint did complete) is left alone.
pub async fn abort_snapshot_dir(dir: &StorageLocation, reason: &str) -> Result<()> {
    if dir.size(MANIFEST_FILE).await?.is_some() {
        return Ok(());
    }
    let files = dir.list_files("").await?;
    if files.iter().all(|(p, _)| p == ABORTED_FILE) && !files.is_empty() {
        return Ok(());
    }
    for (p, _) in files {
        dir.delete(&p).await?;
    }
    dir.put(ABORTED_FILE, Bytes::from(format!("{reason}\n")))
        .await
}

/// Finds the newest snapshot — checkpoint or savepoint `savepoint-<n>`
/// (they share one numbering) — whose manifest and hashes verify, falling
/// back to older ones and recording why newer ones were skipped. A
/// stop-with-savepoint is newer than every checkpoint before it and its
/// output is committed, so resuming from an older checkpoint instead would
/// repeat that output.
pub async fn find_restorable(root: &StorageLocation, job: &JobId) -> Result<RestoreChoice> {
    find_restorable_checked(root, job, |_| Ok(())).await
}

/// [`find_restorable`], also skipping a snapshot that belongs to another
/// job or number, and one that `decodes` refuses (state the runtime cannot
/// read): the restore then falls back to the next older one instead of
/// failing the same way on every restart.
pub async fn find_restorable_checked(
    root: &StorageLocation,
    job: &JobId,
    decodes: impl Fn(&VerifiedCheckpoint) -> std::result::Result<(), String>,
) -> Result<RestoreChoice> {
    let Candidates {
        ids,
        candidates,
        superseded,
    } = candidates(root, job).await?;
    let mut skipped = Vec::new();
    let mut damaged = 0;
    for (id, rel) in candidates.iter().rev() {
        if let Some(newer) = superseded.get(id) {
            skipped.push((
                *id,
                format!(
                    "its region epoch is older than that of a lower-numbered snapshot ({newer}): written by a region that had lost the primary role, not this job's lineage"
                ),
            ));
            continue;
        }
        let dir = root.child(rel);
        match read_verified(&dir).await {
            Ok(Some(cp)) => {
                let m = &cp.manifest;
                let problem = if m.job_id != *job {
                    Some(format!(
                        "its manifest belongs to job '{}' ({}), not this one: a snapshot copied into the wrong directory",
                        m.job_name, m.job_id
                    ))
                } else if m.checkpoint_id != *id {
                    Some(format!(
                        "its manifest is of checkpoint {} but lies in the directory of {id}",
                        m.checkpoint_id
                    ))
                } else {
                    decodes(&cp)
                        .err()
                        .map(|e| format!("its state cannot be decoded: {e}"))
                };
                match problem {
                    None => {
                        return Ok(RestoreChoice {
                            checkpoint: Some(cp),
                            skipped,
                            damaged,
                            highest_id: ids.last().copied(),
                        });
                    }
                    Some(why) => {
                        damaged += 1;
                        skipped.push((*id, why));
                    }
                }
            }
            Ok(None) if dir.size(ABORTED_FILE).await?.is_some() => {
                skipped.push((*id, "an aborted checkpoint attempt".into()))
            }
            Ok(None) => skipped.push((*id, "no MANIFEST.json (incomplete checkpoint)".into())),
            Err(e @ CoreError::Corrupt { .. }) => {
                damaged += 1;
                skipped.push((*id, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(RestoreChoice {
        checkpoint: None,
        skipped,
        damaged,
        highest_id: ids.last().copied(),
    })
}

/// A job's snapshots (checkpoints and savepoints, one numbering) in
/// ascending order, and which of them a newer region epoch superseded.
struct Candidates {
    ids: Vec<CheckpointId>,
    candidates: Vec<(CheckpointId, String)>,
    superseded: BTreeMap<CheckpointId, crate::RegionEpoch>,
}

async fn candidates(root: &StorageLocation, job: &JobId) -> Result<Candidates> {
    let ids = list_checkpoint_ids(root, job).await?;
    let mut candidates: Vec<(CheckpointId, String)> = ids
        .iter()
        .map(|id| (*id, checkpoint_dir(job, *id)))
        .collect();
    for name in root.list_dirs(&savepoints_root(job)).await? {
        if let Some(n) = savepoint_number(&name) {
            candidates.push((n, savepoint_dir(job, &name)));
        }
    }
    candidates.sort();
    // The newer region epoch always wins: a snapshot numbered above one of
    // a newer region epoch was written by a region that had lost the
    // primary role (a late copy of a deposed primary), not by this
    // lineage. Unreadable manifests are judged by the full read.
    let mut newest_epoch = crate::RegionEpoch::NONE;
    let mut superseded = BTreeMap::new();
    for (id, rel) in &candidates {
        if let Ok(Some(m)) = read_manifest(&root.child(rel)).await {
            if m.region_epoch < newest_epoch {
                superseded.insert(*id, newest_epoch);
            }
            newest_epoch = newest_epoch.max(m.region_epoch);
        }
    }
    Ok(Candidates {
        ids,
        candidates,
        superseded,
    })
}

/// The snapshot [`find_restorable`] would pick if every file verified: the
/// newest of this job's lineage with a manifest that names it, read from
/// the manifests alone (no state file is read). Returns its number, its
/// directory relative to `root` and its manifest.
pub async fn newest_complete(
    root: &StorageLocation,
    job: &JobId,
) -> Result<Option<(CheckpointId, String, Manifest)>> {
    let Candidates {
        candidates,
        superseded,
        ..
    } = candidates(root, job).await?;
    for (id, rel) in candidates.into_iter().rev() {
        if superseded.contains_key(&id) {
            continue;
        }
        match read_manifest(&root.child(&rel)).await {
            Ok(Some(m)) if m.job_id == *job && m.checkpoint_id == id => {
                return Ok(Some((id, rel, m)));
            }
            Ok(_) | Err(CoreError::Corrupt { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Writes a manifest with a create-only put. Fails if one already exists:
/// a checkpoint number is completed at most once.
pub async fn write_manifest(dir: &StorageLocation, manifest: &Manifest) -> Result<()> {
    write_manifest_bytes(dir, manifest_bytes(manifest)?).await
}

/// A manifest as `MANIFEST.json` holds it.
pub fn manifest_bytes(manifest: &Manifest) -> Result<Bytes> {
    serde_json::to_vec_pretty(manifest)
        .map(Bytes::from)
        .map_err(|e| CoreError::Other(e.to_string()))
}

/// Writes `MANIFEST.json` (the bytes of [`manifest_bytes`]) into `dir`,
/// create-only, as [`write_manifest`].
pub async fn write_manifest_bytes(dir: &StorageLocation, data: Bytes) -> Result<()> {
    if dir.put_create(MANIFEST_FILE, data).await? {
        Ok(())
    } else {
        Err(CoreError::AlreadyExists {
            path: format!("{}/{MANIFEST_FILE}", dir.url()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_file_is_read_through_the_spool_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let root = StorageLocation::open(dir.path().join("store").to_str().unwrap()).unwrap();
        let data = crate::storage::tests::varied(SPOOL_ABOVE as usize + 12345);
        let job = JobId::new();
        let cp = root.child(&checkpoint_dir(&job, CheckpointId(1)));
        cp.put("w-0.state", Bytes::from(data.clone()))
            .await
            .unwrap();
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": MANIFEST_FORMAT, "job_id": job, "job_name": "big",
            "checkpoint_id": 1, "kind": "checkpoint", "created_at": "2026-12-08T00:00:00Z",
            "jm_epoch": 0, "region_epoch": 0, "parallelism": 1, "watermark": 0,
            "records_in": 0, "records_out": 0, "finished": false, "duration_ms": 0,
            "files": [{"path": "w-0.state", "size": data.len(), "sha256": sha256_hex(&data),
                       "operator": "w", "subtask": 0}],
            "source_offsets": {}, "sink_transactions": []
        }))
        .unwrap();
        write_manifest(&cp, &manifest).await.unwrap();
        set_spool_dir(Some(spool.clone()));
        let read = read_verified(&cp).await;
        // A corrupt copy is refused as it is read.
        let mut bad = data.clone();
        bad[SPOOL_ABOVE as usize] ^= 1;
        cp.put("w-0.state", Bytes::from(bad)).await.unwrap();
        let refused = read_verified(&cp).await;
        set_spool_dir(None);
        let read = read.unwrap().unwrap();
        assert_eq!(read.files["w-0.state"], Bytes::from(data));
        match refused {
            Err(CoreError::Corrupt { reason, .. }) => {
                assert!(reason.contains("SHA-256"), "{reason}")
            }
            other => panic!("expected a corrupt file, got {other:?}"),
        }
        // The spool file is unlinked once mapped (or refused).
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    }

    #[test]
    fn snapshot_paths_share_one_layout() {
        let job: JobId = "01a2058a42c477a285a8423b5e819224".parse().unwrap();
        let n = CheckpointId(7);
        assert_eq!(job_dir(&job), format!("jobs/{job}"));
        assert_eq!(checkpoints_root(&job), format!("jobs/{job}/checkpoints"));
        assert_eq!(savepoints_root(&job), format!("jobs/{job}/savepoints"));
        assert_eq!(
            snapshot_dir(&job, SnapshotKind::Checkpoint, n),
            format!("jobs/{job}/checkpoints/7")
        );
        assert_eq!(
            snapshot_dir(&job, SnapshotKind::Savepoint, n),
            format!("jobs/{job}/savepoints/savepoint-7")
        );
        assert_eq!(
            snapshot_dir(&job, SnapshotKind::Savepoint, n),
            savepoint_dir(&job, &savepoint_name(n))
        );
        assert_eq!(savepoint_number(&savepoint_name(n)), Some(n));
        assert_eq!(savepoint_number("savepoint-x"), None);
        assert_eq!(savepoint_number("before-upgrade"), None);
    }

    #[test]
    fn a_snapshot_dir_opened_by_url_reaches_its_job_dir() {
        for url in [
            "file:///data/jobs/j/checkpoints/7",
            "/data/jobs/j/checkpoints/7",
            "/data/jobs/j/checkpoints/7/",
        ] {
            let dir = open_snapshot_dir(url).unwrap();
            assert_eq!(dir.url(), url.trim_end_matches('/'), "{url}");
            let job = dir.parent().parent();
            let want = if url.starts_with("file://") {
                "file:///data/jobs/j"
            } else {
                "/data/jobs/j"
            };
            assert_eq!(job.url(), want, "{url}");
        }
        // Too short to have a job directory: opened as it is.
        assert_eq!(open_snapshot_dir("/cp").unwrap().url(), "/cp");
    }
}

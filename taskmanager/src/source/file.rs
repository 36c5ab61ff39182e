//! The file source: JSON-lines or CSV files in an object store.
//!
//! Each file is a partition; subtask `j` reads the files (sorted by name)
//! whose index `% parallelism == j`, one after another, in chunks of whole
//! lines. Its offset in a file is the byte position after the last line it
//! has consumed, kept with the line number, the records and bad lines so far
//! and the newest event time read from that file, so a restore resumes at the
//! next unread line with the watermark the subtask had.
//!
//! Invariant: a line is either turned into a record, or counted as bad,
//! exactly once per checkpointed position. A bad line (not UTF-8, invalid
//! JSON, wrong CSV column count, a value that does not fit its declared type,
//! no event time) fails the job naming the file and line (`onBadLine: fail`,
//! a permanent error: a restart would read the same line again) or is logged
//! and counted (`onBadLine: skip`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_core::schema::Schema;
use ferry_core::spec::{BadLinePolicy, FileSourceSpec};
use ferry_core::storage::StorageLocation;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, ColumnBuilder};
use crate::pace::Pace;
use crate::protocol::TaskError;
use crate::source::Poll;
use crate::source::lines::{Line, LineParser};

/// Bytes read per request.
const CHUNK: u64 = 1 << 20;
/// Lines per batch (as the generator's batches).
const MAX_BATCH: usize = 4096;
/// Bad lines logged one by one per subtask and deployment; later ones are
/// only counted (a wrong format would otherwise flood the log).
const BAD_LINES_LOGGED: u64 = 20;

/// Progress in one input file: what a checkpoint stores per partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileState {
    name: String,
    /// Byte position after the last consumed line.
    pos: u64,
    size: u64,
    /// Lines consumed (1-based number of the last one).
    line: u64,
    records: u64,
    /// Bad lines skipped (`onBadLine: skip`).
    skipped: u64,
    /// Newest event time read from this file (`i64::MIN` before any).
    max_ts: i64,
    /// CSV column names once the header line was read.
    header: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    files: Vec<FileState>,
}

/// A file source subtask.
pub struct FileSource {
    dir: StorageLocation,
    files: Vec<FileState>,
    current: usize,
    /// Whole lines of the current file read but not yet consumed; they
    /// start at its `pos` (not part of the state: a restore reads again).
    buffered: Bytes,
    parser: LineParser,
    on_bad_line: BadLinePolicy,
    /// Bad lines logged by this deployment.
    logged_bad: u64,
    ooo: i64,
    max_ts: i64,
    /// `recordsPerSecond`, when given.
    pace: Option<Pace>,
}

/// Where a file is, for messages: the location's URL and the file name.
fn file_url(dir: &StorageLocation, name: &str) -> String {
    format!("{}/{name}", dir.url().trim_end_matches('/'))
}

/// Splits a path URL into its directory URL and an optional name pattern.
fn split_pattern(path: &str) -> (String, Option<String>) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) if trimmed[i + 1..].contains('*') => {
            (trimmed[..i].to_string(), Some(trimmed[i + 1..].to_string()))
        }
        _ => (trimmed.to_string(), None),
    }
}

/// `*` matches any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name.ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl FileSource {
    /// Lists the files of `spec.path` and keeps this subtask's share.
    pub async fn open(
        spec: &FileSourceSpec,
        schema: &Schema,
        subtask: u32,
        parallelism: u32,
    ) -> Result<Self, String> {
        let (dir_url, pattern) = split_pattern(&spec.path);
        let mut files: Vec<(String, u64)> = Vec::new();
        // A single file? (A directory has no size of its own.)
        if pattern.is_none()
            && let Some((parent, name)) = dir_url.rsplit_once('/')
            && let Ok(loc) = StorageLocation::open(parent)
            && let Ok(Some(size)) = loc.size(name).await
        {
            let files = vec![(name.to_string(), size)];
            return Ok(Self::new(loc, files, spec, schema, subtask, parallelism));
        }
        let dir = StorageLocation::open(&dir_url).map_err(|e| e.to_string())?;
        for (name, size) in dir.list_files("").await.map_err(|e| e.to_string())? {
            let base = name.rsplit('/').next().unwrap_or(&name);
            if base.starts_with('.') || base.starts_with('_') {
                continue;
            }
            if pattern
                .as_ref()
                .is_none_or(|p| !name.contains('/') && glob_match(p, &name))
            {
                files.push((name, size));
            }
        }
        if files.is_empty() {
            return Err(format!(
                "no input files match '{}'; check spec.source.file.path",
                spec.path
            ));
        }
        Ok(Self::new(dir, files, spec, schema, subtask, parallelism))
    }

    fn new(
        dir: StorageLocation,
        mut files: Vec<(String, u64)>,
        spec: &FileSourceSpec,
        schema: &Schema,
        subtask: u32,
        parallelism: u32,
    ) -> Self {
        files.sort();
        let mine = files
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == subtask)
            .map(|(_, (name, size))| FileState {
                name,
                pos: 0,
                size,
                line: 0,
                records: 0,
                skipped: 0,
                max_ts: i64::MIN,
                header: None,
            })
            .collect();
        Self {
            dir,
            files: mine,
            current: 0,
            buffered: Bytes::new(),
            parser: LineParser::new(
                spec.format,
                spec.header,
                spec.delimiter.as_bytes().first().copied().unwrap_or(b','),
                Arc::new(schema.clone()),
                spec.event_time
                    .as_ref()
                    .and_then(|e| schema.index_of(&e.field)),
            ),
            on_bad_line: spec.on_bad_line,
            logged_bad: 0,
            ooo: spec
                .event_time
                .as_ref()
                .map(|e| e.max_out_of_orderness.as_millis())
                .unwrap_or(0),
            max_ts: i64::MIN,
            pace: spec.records_per_second.map(Pace::new),
        }
    }

    pub async fn poll(&mut self) -> Result<Poll, TaskError> {
        if let Some(p) = &self.pace {
            let wait = p.wait();
            if !wait.is_zero() {
                return Ok(Poll::Idle(wait));
            }
        }
        let max_lines = self.pace.as_ref().map_or(MAX_BATCH, |p| p.batch(MAX_BATCH));
        loop {
            if self.buffered.is_empty() {
                while self
                    .files
                    .get(self.current)
                    .is_some_and(|f| f.pos >= f.size)
                {
                    self.current += 1;
                }
                if self.current == self.files.len() {
                    return Ok(Poll::End);
                }
                self.buffered = self.read_lines().await?;
            }
            // At most MAX_BATCH lines per batch (about 10 ms of them when
            // paced), so that a checkpoint barrier never waits behind more.
            let take = self
                .buffered
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .nth(max_lines - 1)
                .map_or(self.buffered.len(), |(i, _)| i + 1);
            let lines = self.buffered.split_to(take);
            let batch = self.parse(&lines)?;
            self.files[self.current].pos += lines.len() as u64;
            if let Some(b) = batch {
                if let Some(p) = &mut self.pace {
                    p.take(b.len());
                }
                return Ok(Poll::Batch(b));
            }
        }
    }

    /// Reads whole lines of the current file from its position: up to
    /// `CHUNK` bytes, more if one line is longer, the rest of the file at its
    /// end (a last line without a newline).
    async fn read_lines(&self) -> Result<Bytes, TaskError> {
        let f = &self.files[self.current];
        let (pos, size) = (f.pos, f.size);
        let mut len = CHUNK.min(size - pos);
        loop {
            let data = self
                .dir
                .get_range(&f.name, pos..pos + len)
                .await
                .map_err(|e| TaskError::Transient(e.to_string()))?;
            match data.iter().rposition(|b| *b == b'\n') {
                Some(nl) => return Ok(data.slice(..=nl)),
                None if pos + len >= size => return Ok(data),
                None => len = (len * 2).min(size - pos),
            }
        }
    }

    /// Turns whole lines of the current file into a batch. The file's
    /// counters change only if every line was consumed.
    fn parse(&mut self, data: &Bytes) -> Result<Option<Batch>, TaskError> {
        let Self {
            dir,
            files,
            current,
            parser: p,
            on_bad_line,
            logged_bad,
            max_ts,
            ..
        } = self;
        let mut builders: Vec<ColumnBuilder> = p
            .schema
            .fields
            .iter()
            .map(|_| ColumnBuilder::new())
            .collect();
        let mut ts = Vec::new();
        let mut f = files[*current].clone();
        let now = chrono::Utc::now().timestamp_millis();
        for raw in data.split_inclusive(|b| *b == b'\n') {
            f.line += 1;
            let parsed = match std::str::from_utf8(raw) {
                Ok(text) => {
                    let line = text.trim_end_matches(['\n', '\r']);
                    if line.trim().is_empty() {
                        continue;
                    }
                    p.parse(line, &mut f.header)
                }
                Err(e) => Err(format!("not UTF-8 text: {e}")),
            };
            match parsed {
                Ok(Line::Header) => {
                    // Not a bad line: a mismatch with the spec, on every line.
                    let h = f.header.as_deref().unwrap_or_default();
                    p.check_header(h).map_err(|e| {
                        TaskError::Permanent(format!("{}: {e}", file_url(dir, &f.name)))
                    })?;
                }
                Ok(Line::Record(values, t)) => {
                    let t = t.unwrap_or(now);
                    f.max_ts = f.max_ts.max(t);
                    ts.push(t);
                    f.records += 1;
                    for (b, v) in builders.iter_mut().zip(values) {
                        b.push(v);
                    }
                }
                Err(reason) => {
                    let at = format!("{} line {}", file_url(dir, &f.name), f.line);
                    if *on_bad_line == BadLinePolicy::Fail {
                        return Err(TaskError::Permanent(format!(
                            "{at}: {reason} (set spec.source.file.onBadLine: skip to skip and count such lines)"
                        )));
                    }
                    f.skipped += 1;
                    *logged_bad += 1;
                    if *logged_bad <= BAD_LINES_LOGGED {
                        tracing::warn!("skipping bad line: {at}: {reason}");
                    }
                    if *logged_bad == BAD_LINES_LOGGED {
                        tracing::warn!(
                            "{BAD_LINES_LOGGED} bad lines logged; further ones are only counted (ferry_job_skipped_records_total)"
                        );
                    }
                }
            }
        }
        *max_ts = (*max_ts).max(f.max_ts);
        files[*current] = f;
        if ts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch {
            schema: p.schema.clone(),
            columns: builders.into_iter().map(|b| b.finish()).collect(),
            ts,
        }))
    }

    pub fn watermark(&self) -> i64 {
        super::bounded_watermark(self.max_ts, self.ooo)
    }

    pub fn snapshot(&self) -> Result<(Vec<u8>, BTreeMap<String, serde_json::Value>), String> {
        let offsets = self
            .files
            .iter()
            .map(|f| {
                (
                    format!("file:{}", f.name),
                    serde_json::json!({
                        "position": f.pos,
                        "size": f.size,
                        "line": f.line,
                        "records": f.records,
                        "skipped": f.skipped,
                    }),
                )
            })
            .collect();
        let st = State {
            files: self.files.clone(),
        };
        Ok((
            postcard::to_stdvec(&st).map_err(|e| e.to_string())?,
            offsets,
        ))
    }

    /// Restores the offsets of this subtask's files from the snapshots of
    /// all old subtasks (files may have moved between subtasks). The
    /// watermark restarts from the newest event time read from *these*
    /// files, as it was when the same subtask read them: taking it from
    /// other subtasks' files would let it run ahead of this subtask's
    /// unread records and make them late.
    /// Decodes one snapshot part without restoring it (restore checks).
    pub fn check_state(part: &[u8]) -> Result<(), String> {
        postcard::from_bytes::<State>(part)
            .map(drop)
            .map_err(|e| format!("file source state is unreadable: {e}"))
    }

    pub fn restore(&mut self, parts: &[Bytes]) -> Result<(), String> {
        let mut by_name = BTreeMap::new();
        for part in parts {
            let st: State = postcard::from_bytes(part)
                .map_err(|e| format!("file source state is unreadable: {e}"))?;
            for f in st.files {
                by_name.insert(f.name.clone(), f);
            }
        }
        for f in &mut self.files {
            if let Some(s) = by_name.remove(&f.name) {
                *f = FileState { size: f.size, ..s };
            }
        }
        self.max_ts = self
            .files
            .iter()
            .map(|f| f.max_ts)
            .max()
            .unwrap_or(i64::MIN);
        self.current = 0;
        self.buffered = Bytes::new();
        Ok(())
    }

    pub fn records_read(&self) -> u64 {
        self.files.iter().map(|f| f.records).sum()
    }

    pub fn skipped_records(&self) -> u64 {
        self.files.iter().map(|f| f.skipped).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*.jsonl", "a.jsonl"));
        assert!(glob_match("part-*-x.csv", "part-1-x.csv"));
        assert!(!glob_match("*.jsonl", "a.csv"));
        assert!(!glob_match("a*b*c", "acb"));
        assert_eq!(
            split_pattern("s3://b/in/*.csv"),
            ("s3://b/in".to_string(), Some("*.csv".to_string()))
        );
    }

    /// A source over `files` (name, contents) in a temp dir, subtask 0 of 1.
    async fn source(
        files: &[(&str, &str)],
        spec: serde_json::Value,
        subtask: u32,
        parallelism: u32,
    ) -> (tempfile::TempDir, FileSource) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut spec = spec;
        spec["path"] = dir.path().to_str().unwrap().into();
        let spec: FileSourceSpec = serde_json::from_value(spec).unwrap();
        let schema = Schema::new(spec.schema.iter().map(|(n, t)| (n.clone(), *t)));
        let src = FileSource::open(&spec, &schema, subtask, parallelism)
            .await
            .unwrap();
        (dir, src)
    }

    fn jsonl_spec(on_bad_line: &str) -> serde_json::Value {
        serde_json::json!({
            "format": "jsonl",
            "schema": {"user": "string", "n": "int", "ts": "timestamp"},
            "eventTime": {"field": "ts"},
            "onBadLine": on_bad_line,
        })
    }

    /// Polls until the end; returns the records read or the first error.
    async fn drain(src: &mut FileSource) -> Result<usize, TaskError> {
        let mut n = 0;
        loop {
            match src.poll().await? {
                Poll::Batch(b) => n += b.len(),
                Poll::End => return Ok(n),
                Poll::Idle(_) | Poll::Wait => {}
            }
        }
    }

    const GOOD: &str = "{\"user\":\"a\",\"n\":1,\"ts\":1000}\n";

    #[tokio::test]
    async fn a_bad_line_fails_permanently_naming_file_and_line() {
        let cases = [
            (
                "{\"user\":\"a\",\"n\":1,\"ts\":",
                "invalid JSON object at column",
            ),
            ("[1,2]", "invalid JSON object"),
            (
                "{\"user\":\"a\",\"n\":\"many\",\"ts\":5}",
                "field 'n': expected int, found \"many\"",
            ),
            (
                "{\"user\":\"a\",\"n\":1.5,\"ts\":5}",
                "field 'n': expected int, found 1.5",
            ),
            (
                "{\"user\":\"a\",\"n\":1}",
                "event-time field 'ts' is missing",
            ),
            (
                "{\"user\":\"a\",\"n\":1,\"ts\":\"yesterday\"}",
                "field 'ts': expected timestamp",
            ),
        ];
        for (bad, reason) in cases {
            let text = format!("{GOOD}\n{GOOD}{bad}\n{GOOD}");
            let (_d, mut src) = source(&[("in.jsonl", &text)], jsonl_spec("fail"), 0, 1).await;
            let err = drain(&mut src).await.unwrap_err();
            let TaskError::Permanent(msg) = &err else {
                panic!("not permanent: {err:?}")
            };
            assert!(msg.contains("in.jsonl line 4: "), "{msg}");
            assert!(msg.contains(reason), "{bad}: {msg}");
            assert!(msg.contains("onBadLine"), "{msg}");
        }
    }

    #[tokio::test]
    async fn a_paced_source_reads_small_batches_no_faster_than_its_rate() {
        let text = GOOD.repeat(300);
        let mut spec = jsonl_spec("fail");
        spec["recordsPerSecond"] = 1000.into();
        let (_d, mut src) = source(&[("in.jsonl", &text)], spec, 0, 1).await;
        let start = std::time::Instant::now();
        let (mut n, mut idle) = (0, 0);
        loop {
            match src.poll().await.unwrap() {
                Poll::Batch(b) => {
                    assert!(b.len() <= 10, "about 10 ms of records: {}", b.len());
                    n += b.len();
                }
                Poll::Idle(d) => {
                    idle += 1;
                    tokio::time::sleep(d).await;
                }
                Poll::End => break,
                Poll::Wait => panic!("a file source never waits"),
            }
        }
        assert_eq!(n, 300);
        assert!(idle > 0, "it waited for its rate");
        // 300 records at 1000/s: the last batch is taken at 0.29 s at the
        // earliest.
        let took = start.elapsed();
        assert!(took >= std::time::Duration::from_millis(290), "{took:?}");
    }

    #[tokio::test]
    async fn skipped_lines_are_counted_in_the_checkpointed_offsets() {
        let text = format!("{GOOD}not json\n{GOOD}{{\"n\":\"x\",\"ts\":1}}\n{GOOD}");
        let mut bytes = text.into_bytes();
        // A line that is not UTF-8.
        bytes.extend_from_slice(b"\xff\xfe\n");
        bytes.extend_from_slice(GOOD.as_bytes());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), &bytes).unwrap();
        let mut spec = jsonl_spec("skip");
        spec["path"] = dir.path().join("in.jsonl").to_str().unwrap().into();
        let spec: FileSourceSpec = serde_json::from_value(spec).unwrap();
        let schema = Schema::new(spec.schema.iter().map(|(n, t)| (n.clone(), *t)));
        let mut src = FileSource::open(&spec, &schema, 0, 1).await.unwrap();
        assert_eq!(drain(&mut src).await.unwrap(), 4);
        assert_eq!(src.skipped_records(), 3);
        assert_eq!(src.records_read(), 4);
        let (_, offsets) = src.snapshot().unwrap();
        let o = &offsets["file:in.jsonl"];
        assert_eq!(o["skipped"], 3);
        assert_eq!(o["records"], 4);
        assert_eq!(o["position"], bytes.len());
    }

    #[tokio::test]
    async fn csv_column_counts_and_types_are_checked() {
        let spec = |header: bool, on_bad_line: &str| {
            serde_json::json!({
                "format": "csv",
                "header": header,
                "schema": {"user": "string", "amount": "float"},
                "onBadLine": on_bad_line,
            })
        };
        let with_header = "amount,user\n1.5,a\n2,b,extra\nlots,c\n3,d\n";
        let (_d, mut src) = source(&[("in.csv", with_header)], spec(true, "fail"), 0, 1).await;
        let msg = drain(&mut src).await.unwrap_err().to_string();
        assert!(
            msg.contains("in.csv line 3: expected 2 columns (as in the header), found 3"),
            "{msg}"
        );
        let (_d, mut src) = source(&[("in.csv", with_header)], spec(true, "skip"), 0, 1).await;
        assert_eq!(drain(&mut src).await.unwrap(), 2);
        assert_eq!(src.skipped_records(), 2);

        // (json! sorts the schema's keys: the column order is amount, user.)
        let no_header = "1.5,a\nnan-ish,b\nc\n";
        let (_d, mut src) = source(&[("in.csv", no_header)], spec(false, "fail"), 0, 1).await;
        let msg = drain(&mut src).await.unwrap_err().to_string();
        assert!(
            msg.contains("in.csv line 2: field 'amount': expected float, found \"nan-ish\""),
            "{msg}"
        );
        let (_d, mut src) = source(&[("in.csv", no_header)], spec(false, "skip"), 0, 1).await;
        assert_eq!(drain(&mut src).await.unwrap(), 1);
        assert_eq!(src.skipped_records(), 2);

        // A header without a schema field is a spec mismatch: never skipped.
        let (_d, mut src) =
            source(&[("in.csv", "usr,amount\na,1\n")], spec(true, "skip"), 0, 1).await;
        let err = drain(&mut src).await.unwrap_err();
        assert!(matches!(err, TaskError::Permanent(_)), "{err:?}");
        assert!(err.to_string().contains("no column 'user'"), "{err}");
    }

    /// After a restore a subtask's watermark comes from its own files, not
    /// from files another subtask had read further (that made its unread
    /// records late after every restore).
    #[tokio::test]
    async fn restore_keeps_each_subtask_watermark() {
        let early = "{\"user\":\"a\",\"n\":1,\"ts\":1000}\n".repeat(3);
        let late = "{\"user\":\"a\",\"n\":1,\"ts\":900000}\n".repeat(3);
        let files = [("0.jsonl", early.as_str()), ("1.jsonl", late.as_str())];
        let (d, mut s0) = source(&files, jsonl_spec("fail"), 0, 2).await;
        let mut spec = jsonl_spec("fail");
        spec["path"] = d.path().to_str().unwrap().into();
        let spec: FileSourceSpec = serde_json::from_value(spec).unwrap();
        let schema = Schema::new(spec.schema.iter().map(|(n, t)| (n.clone(), *t)));
        let mut s1 = FileSource::open(&spec, &schema, 1, 2).await.unwrap();
        drain(&mut s0).await.unwrap();
        drain(&mut s1).await.unwrap();
        let parts: Vec<Bytes> = [&s0, &s1]
            .iter()
            .map(|s| Bytes::from(s.snapshot().unwrap().0))
            .collect();
        let mut r0 = FileSource::open(&spec, &schema, 0, 2).await.unwrap();
        r0.restore(&parts).unwrap();
        assert_eq!(r0.watermark(), 999);
        assert_eq!(r0.records_read(), 3);
        // At parallelism 1 the one subtask has read both files.
        let mut all = FileSource::open(&spec, &schema, 0, 1).await.unwrap();
        all.restore(&parts).unwrap();
        assert_eq!(all.watermark(), 899_999);
        assert!(matches!(all.poll().await.unwrap(), Poll::End));
    }
}

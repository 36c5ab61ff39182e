//! The file source: JSON-lines or CSV files in an object store.
//!
//! Each file is a partition; subtask `j` reads the files (sorted by name)
//! whose index `% parallelism == j`, one after another, in chunks. Its offset
//! is (file, byte position after the last complete line), so a restore
//! resumes at the next unread line. A malformed line fails the task with the
//! file name and line number.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::spec::{FileFormat, FileSourceSpec};
use ferry_core::storage::StorageLocation;
use ferry_core::value::{DataType, Value, parse_ts};
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, ColumnBuilder};
use crate::source::Poll;

/// Bytes read per request.
const CHUNK: u64 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileState {
    name: String,
    pos: u64,
    size: u64,
    line: u64,
    records: u64,
    header: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    files: Vec<FileState>,
    max_ts: i64,
}

/// A file source subtask.
pub struct FileSource {
    dir: StorageLocation,
    files: Vec<FileState>,
    current: usize,
    format: FileFormat,
    header: bool,
    delimiter: u8,
    schema: SchemaRef,
    ts_idx: Option<usize>,
    ooo: i64,
    max_ts: i64,
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
                header: None,
            })
            .collect();
        Self {
            dir,
            files: mine,
            current: 0,
            format: spec.format,
            header: spec.header,
            delimiter: spec.delimiter.as_bytes().first().copied().unwrap_or(b','),
            schema: Arc::new(schema.clone()),
            ts_idx: spec
                .event_time
                .as_ref()
                .and_then(|e| schema.index_of(&e.field)),
            ooo: spec
                .event_time
                .as_ref()
                .map(|e| e.max_out_of_orderness.as_millis())
                .unwrap_or(0),
            max_ts: i64::MIN,
        }
    }

    pub async fn poll(&mut self) -> Result<Poll, String> {
        while self.current < self.files.len() {
            let f = &self.files[self.current];
            if f.pos >= f.size {
                self.current += 1;
                continue;
            }
            let (name, pos, size) = (f.name.clone(), f.pos, f.size);
            let mut len = CHUNK.min(size - pos);
            let (data, consumed) = loop {
                let data = self
                    .dir
                    .get_range(&name, pos..pos + len)
                    .await
                    .map_err(|e| e.to_string())?;
                match data.iter().rposition(|b| *b == b'\n') {
                    Some(nl) => break (data.slice(..=nl), nl as u64 + 1),
                    None if pos + len >= size => break (data.clone(), len),
                    None => len = (len * 2).min(size - pos),
                }
            };
            let batch = self.parse(&data)?;
            let f = &mut self.files[self.current];
            f.pos += consumed;
            if let Some(b) = batch {
                return Ok(Poll::Batch(b));
            }
        }
        Ok(Poll::End)
    }

    fn parse(&mut self, data: &Bytes) -> Result<Option<Batch>, String> {
        let fields = &self.schema.fields;
        let mut builders: Vec<ColumnBuilder> =
            fields.iter().map(|_| ColumnBuilder::new()).collect();
        let mut ts = Vec::new();
        let f = &mut self.files[self.current];
        let text = std::str::from_utf8(data)
            .map_err(|e| format!("{}: not UTF-8 text near byte {}: {e}", f.name, f.pos))?;
        let now = chrono::Utc::now().timestamp_millis();
        for raw in text.split_inclusive('\n') {
            f.line += 1;
            let line = raw.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                continue;
            }
            let values: Vec<Value> = match self.format {
                FileFormat::Jsonl => {
                    let obj: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(line).map_err(|e| {
                            format!("{} line {}: invalid JSON: {e}", f.name, f.line)
                        })?;
                    fields
                        .iter()
                        .map(|fd| convert_json(obj.get(&fd.name), fd.data_type))
                        .collect()
                }
                FileFormat::Csv => {
                    let mut rdr = csv::ReaderBuilder::new()
                        .has_headers(false)
                        .delimiter(self.delimiter)
                        .from_reader(line.as_bytes());
                    let rec = match rdr.records().next() {
                        Some(Ok(r)) => r,
                        Some(Err(e)) => {
                            return Err(format!("{} line {}: invalid CSV: {e}", f.name, f.line));
                        }
                        None => continue,
                    };
                    if self.header && f.header.is_none() {
                        f.header = Some(rec.iter().map(|s| s.trim().to_string()).collect());
                        continue;
                    }
                    fields
                        .iter()
                        .enumerate()
                        .map(|(i, fd)| {
                            let pos = match &f.header {
                                Some(h) => h.iter().position(|n| n == &fd.name),
                                None => Some(i),
                            };
                            convert_text(pos.and_then(|p| rec.get(p)), fd.data_type)
                        })
                        .collect()
                }
            };
            let t = match self.ts_idx {
                Some(i) => match &values[i] {
                    Value::Ts(t) | Value::Int(t) => *t,
                    _ => {
                        return Err(format!(
                            "{} line {}: event-time field '{}' is missing or not a timestamp",
                            f.name, f.line, fields[i].name
                        ));
                    }
                },
                None => now,
            };
            self.max_ts = self.max_ts.max(t);
            ts.push(t);
            f.records += 1;
            for (b, v) in builders.iter_mut().zip(values) {
                b.push(v);
            }
        }
        if ts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch {
            schema: self.schema.clone(),
            columns: builders.into_iter().map(|b| b.finish()).collect(),
            ts,
        }))
    }

    pub fn watermark(&self) -> i64 {
        if self.max_ts == i64::MIN {
            i64::MIN
        } else {
            self.max_ts - self.ooo - 1
        }
    }

    pub fn snapshot(&self) -> Result<(Vec<u8>, BTreeMap<String, serde_json::Value>), String> {
        let offsets = self
            .files
            .iter()
            .map(|f| {
                (
                    format!("file:{}", f.name),
                    serde_json::json!({"position": f.pos, "line": f.line}),
                )
            })
            .collect();
        let st = State {
            files: self.files.clone(),
            max_ts: self.max_ts,
        };
        Ok((
            postcard::to_stdvec(&st).map_err(|e| e.to_string())?,
            offsets,
        ))
    }

    pub fn restore(&mut self, parts: &[Bytes]) -> Result<(), String> {
        let mut by_name = BTreeMap::new();
        let mut max_ts = i64::MIN;
        for part in parts {
            let st: State = postcard::from_bytes(part)
                .map_err(|e| format!("file source state is unreadable: {e}"))?;
            max_ts = max_ts.max(st.max_ts);
            for f in st.files {
                by_name.insert(f.name.clone(), f);
            }
        }
        for f in &mut self.files {
            if let Some(s) = by_name.remove(&f.name) {
                *f = FileState { size: f.size, ..s };
            }
        }
        self.max_ts = max_ts;
        self.current = 0;
        Ok(())
    }

    pub fn records_read(&self) -> u64 {
        self.files.iter().map(|f| f.records).sum()
    }
}

/// Converts a JSON value to a field of type `ty` (`null` when it does not fit).
pub(crate) fn convert_json(v: Option<&serde_json::Value>, ty: DataType) -> Value {
    use serde_json::Value as J;
    let Some(v) = v else { return Value::Null };
    match (ty, v) {
        (_, J::Null) => Value::Null,
        (DataType::String, J::String(s)) => Value::Str(s.as_str().into()),
        (DataType::String, other) => Value::Str(other.to_string().into()),
        (DataType::Int, J::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
            .map_or(Value::Null, Value::Int),
        (DataType::Float, J::Number(n)) => n.as_f64().map_or(Value::Null, Value::Float),
        (DataType::Bool, J::Bool(b)) => Value::Bool(*b),
        (DataType::Timestamp, J::Number(n)) => n.as_i64().map_or(Value::Null, Value::Ts),
        (DataType::Timestamp, J::String(s)) => parse_ts(s).map_or(Value::Null, Value::Ts),
        (DataType::Int | DataType::Float | DataType::Bool, J::String(s)) => {
            convert_text(Some(s), ty)
        }
        (DataType::Any, J::Bool(b)) => Value::Bool(*b),
        (DataType::Any, J::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float))
            .unwrap_or(Value::Null),
        (DataType::Any, J::String(s)) => Value::Str(s.as_str().into()),
        (DataType::Any, other) => Value::Str(other.to_string().into()),
        _ => Value::Null,
    }
}

fn convert_text(s: Option<&str>, ty: DataType) -> Value {
    let Some(s) = s.map(str::trim) else {
        return Value::Null;
    };
    if s.is_empty() {
        return Value::Null;
    }
    match ty {
        DataType::String | DataType::Any => Value::Str(s.into()),
        DataType::Int => s.parse().map_or(Value::Null, Value::Int),
        DataType::Float => s.parse().map_or(Value::Null, Value::Float),
        DataType::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => Value::Null,
        },
        DataType::Timestamp => parse_ts(s).map_or(Value::Null, Value::Ts),
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
}

//! Parsing spec text (YAML or JSON) into a [`JobSpec`], with every problem
//! reported by field path and 1-based line/column.
//!
//! The text is read once ([`read`]) into a tree that keeps positions
//! ([`tree`]); the typed spec is deserialized straight from that tree ([`de`]). When
//! deserialization fails, the offending node is cut out of a working copy
//! (or replaced by a placeholder where the field is required) and the pass is
//! repeated, so one run reports the problems of every section and operator,
//! not just the first. Semantic validation then runs on the repaired spec,
//! keeping only the issues that a repair cannot have caused.
//!
//! Invariant: no input text makes these functions panic, and every
//! [`SpecError`] they return has a line and column.

mod de;
mod read;
mod tree;

use std::fmt;

use serde::de::DeserializeOwned;

use crate::spec::validate::output_schemas;
use crate::spec::{GeneratorField, JobSpec, RestartStrategy};
use de::{De, DeError, ErrorKind};
use read::Read;
use tree::{Kind, Node, Path, Pos, Scalar, Seg, is_prefix, path_string};

/// The text format of a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecFormat {
    Yaml,
    Json,
}

impl SpecFormat {
    /// JSON when the text starts (after blanks) with `{` or `[`, else YAML.
    /// Both are read by the same parser; this only words messages.
    pub fn detect(text: &str) -> SpecFormat {
        match text
            .trim_start_matches('\u{feff}')
            .trim_start()
            .chars()
            .next()
        {
            Some('{' | '[') => SpecFormat::Json,
            _ => SpecFormat::Yaml,
        }
    }
}

/// One problem in a spec, located by field path and (where known) line/column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// Dotted field path, e.g. `spec.operators[2].window.tumbling`; empty for
    /// document-level problems.
    pub path: String,
    /// 1-based line and column in the submitted text.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
            (Some(l), None) => write!(f, "line {l}: ")?,
            _ => {}
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// All problems found in one spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Parses the text of a spec (YAML, or JSON, which is detected) into typed
/// form, without semantic checks, reporting every structural problem.
pub fn parse_spec(text: &str) -> Result<JobSpec, SpecErrors> {
    check(text, false).finish()
}

/// Parses and validates a spec, returning every problem found.
pub fn parse_and_validate(text: &str) -> Result<JobSpec, SpecErrors> {
    check(text, true).finish()
}

/// Most repair rounds of one typed pass (each round finds one problem).
const MAX_ROUNDS: usize = 200;

/// A problem before it is turned into a [`SpecError`].
struct Problem {
    path: String,
    pos: Pos,
    message: String,
}

/// The outcome of checking one text.
struct Checked {
    spec: Option<JobSpec>,
    problems: Vec<Problem>,
}

impl Checked {
    fn finish(mut self) -> Result<JobSpec, SpecErrors> {
        match self.spec {
            Some(spec) if self.problems.is_empty() => Ok(spec),
            _ => {
                self.problems
                    .sort_by(|a, b| (a.pos, &a.path).cmp(&(b.pos, &b.path)));
                self.problems
                    .dedup_by(|a, b| a.path == b.path && a.message == b.message);
                if self.problems.is_empty() {
                    self.problems.push(Problem {
                        path: String::new(),
                        pos: Pos::START,
                        message: "the spec could not be read".into(),
                    });
                }
                Err(SpecErrors(
                    self.problems
                        .into_iter()
                        .map(|p| SpecError {
                            path: p.path,
                            line: Some(p.pos.line),
                            column: Some(p.pos.column),
                            message: p.message,
                        })
                        .collect(),
                ))
            }
        }
    }
}

fn check(text: &str, semantic: bool) -> Checked {
    let (root, tree_problems) = match read::read(text) {
        Read::Tree(root, problems) => (root, problems),
        Read::Fatal(p) => {
            let message = match (
                SpecFormat::detect(text),
                p.message.strip_prefix("syntax error: "),
            ) {
                (SpecFormat::Json, Some(m)) => format!("invalid JSON: {m}"),
                (SpecFormat::Yaml, Some(m)) => format!("invalid YAML: {m}"),
                (_, None) => p.message,
            };
            return Checked {
                spec: None,
                problems: vec![Problem {
                    path: path_string(&p.path),
                    pos: p.pos,
                    message,
                }],
            };
        }
    };
    let top = "a mapping with apiVersion, kind, metadata and spec";
    let found = match &root.kind {
        Kind::Map(_) => None,
        Kind::Scalar(Scalar::Null, _) => Some(format!("the spec is empty; expected {top}")),
        Kind::Scalar(..) => Some(format!("expected {top}, found a single value")),
        Kind::Seq(_) => Some(format!("expected {top}, found a list")),
    };
    if let Some(message) = found {
        return Checked {
            spec: None,
            problems: vec![Problem {
                path: String::new(),
                pos: root.pos,
                message,
            }],
        };
    }

    let mut pass = TypedPass::new(&root);
    for p in tree_problems {
        pass.report(&p.path, p.pos, p.message);
        pass.taints.push(p.path);
    }
    let spec = pass.run();
    let mut problems = pass.problems;
    if semantic
        && let Some(spec) = &spec
        && let Err(issues) = output_schemas(spec)
    {
        for issue in issues {
            let path = root.parse_path(&issue.path);
            if pass.taints.iter().all(|t| !overlaps(t, &path)) {
                problems.push(Problem {
                    pos: root.locate(&path),
                    path: issue.path,
                    message: issue.message,
                });
            }
        }
    }
    Checked { spec, problems }
}

/// Whether a semantic issue at `issue` may be an effect of repairing `taint`:
/// one contains the other, or the taint is upstream of the issue in the
/// record flow (source before operators, operator i before operator i+1..).
fn overlaps(taint: &[Seg], issue: &[Seg]) -> bool {
    if is_prefix(taint, issue) || is_prefix(issue, taint) {
        return true;
    }
    let key = |s: &str| Seg::Key(s.to_string());
    let source = [key("spec"), key("source")];
    let operators = [key("spec"), key("operators")];
    let op_index = |p: &[Seg]| match p.get(2) {
        Some(Seg::Index(i)) if is_prefix(&operators, p) => Some(*i),
        _ => None,
    };
    match (op_index(taint), op_index(issue)) {
        (Some(t), Some(i)) => t <= i,
        (None, Some(_)) => is_prefix(&source, taint),
        _ => false,
    }
}

/// How a working copy of the tree is repaired after a problem.
enum Fix {
    Remove(Path),
    Insert {
        parent: Path,
        key: String,
        node: Node,
    },
}

/// The typed pass: deserialize, and on failure report, repair and retry.
struct TypedPass<'a> {
    /// The tree as written (for positions).
    root: &'a Node,
    /// The copy being repaired.
    work: Node,
    problems: Vec<Problem>,
    /// Paths already reported; problems at them or their ancestors are
    /// consequences of earlier repairs and are not reported again.
    reported: Vec<Path>,
    /// Paths whose content was changed by a repair.
    taints: Vec<Path>,
}

impl<'a> TypedPass<'a> {
    fn new(root: &'a Node) -> Self {
        TypedPass {
            root,
            work: root.clone(),
            problems: Vec::new(),
            reported: Vec::new(),
            taints: Vec::new(),
        }
    }

    fn report(&mut self, path: &[Seg], pos: Pos, message: String) {
        if self.reported.iter().any(|r| is_prefix(path, r)) {
            return;
        }
        self.reported.push(path.to_vec());
        self.problems.push(Problem {
            path: path_string(path),
            pos,
            message,
        });
    }

    fn run(&mut self) -> Option<JobSpec> {
        for _ in 0..MAX_ROUNDS {
            let err = match serde_path_to_error::deserialize::<_, JobSpec>(De(&self.work)) {
                Ok(spec) => return Some(spec),
                Err(e) => e,
            };
            let path = serde_path(err.path());
            if !self.handle(path, err.into_inner()) {
                return None;
            }
        }
        self.problems.push(Problem {
            path: String::new(),
            pos: self.root.pos,
            message: format!("stopped after {MAX_ROUNDS} problems; fix these and check again"),
        });
        None
    }

    /// Reports one deserialization problem and repairs the working copy;
    /// false when no repair is possible.
    fn handle(&mut self, mut path: Path, err: DeError) -> bool {
        let root = self.root;
        let fix = match err.kind {
            ErrorKind::UnknownField(field) => {
                if path.last() != Some(&Seg::Key(field.clone())) {
                    path.push(Seg::Key(field.clone()));
                }
                let pos = root
                    .key_pos(&path[..path.len() - 1], &field)
                    .unwrap_or_else(|| root.locate(&path));
                self.report(&path, pos, err.message);
                // Dropping an unknown key leaves what the author meant: no taint.
                return self.apply(Fix::Remove(path), false);
            }
            ErrorKind::UnknownVariant(variant) => {
                let node = root.at(&path);
                let entry = |k: &str| node.and_then(|n| n.entry(k));
                let mut at = path.clone();
                let mut pos = root.locate(&path);
                if let Some(e) = entry(&variant).filter(
                    |_| matches!(node.map(|n| &n.kind), Some(Kind::Map(es)) if es.len() == 1),
                ) {
                    at.push(Seg::Key(variant.clone()));
                    pos = e.key_pos;
                } else if let Some(e) = entry("type")
                    .filter(|e| matches!(&e.value.kind, Kind::Scalar(_, raw) if *raw == variant))
                {
                    at.push(Seg::Key("type".into()));
                    pos = e.value.pos;
                }
                let noun = if at.last() == Some(&Seg::Key("type".into())) {
                    "type"
                } else {
                    noun_for(&path)
                };
                self.report(
                    &at,
                    pos,
                    format!("unknown {noun} '{variant}'; {}", err.message),
                );
                Fix::Remove(path)
            }
            ErrorKind::MissingField(field) => {
                let mut at = path.clone();
                at.push(Seg::Key(field.clone()));
                let message = format!("{}; {}", err.message, missing_hint(&at));
                self.report(&at, root.locate(&at), message);
                match placeholder(&at) {
                    Some(node) => Fix::Insert {
                        parent: path,
                        key: field,
                        node,
                    },
                    None => Fix::Remove(path),
                }
            }
            ErrorKind::Other => {
                let at = culprit(root, &path, &err).unwrap_or_else(|| path.clone());
                self.report(&at, root.locate(&at), err.message);
                Fix::Remove(path)
            }
        };
        self.apply(fix, true)
    }

    /// Repairs the working copy; `taint` marks the change as one that may
    /// cause semantic issues of its own. False when no repair is possible.
    fn apply(&mut self, fix: Fix, taint: bool) -> bool {
        let (at, done) = match fix {
            Fix::Insert { parent, key, node } => {
                let mut at = parent.clone();
                at.push(Seg::Key(key.clone()));
                if self.taints.contains(&at) {
                    return false;
                }
                let done = self.work.insert(&parent, &key, node);
                (at, done)
            }
            Fix::Remove(path) => {
                let mut at = path[..self.work.existing_len(&path)].to_vec();
                if let [Seg::Key(s), Seg::Key(o), Seg::Index(_)] = at.as_slice()
                    && s == "spec"
                    && o == "operators"
                {
                    // A broken operator: put a neutral one in its place, so
                    // the later operators keep their indices.
                    if self.taints.contains(&at) {
                        return false;
                    }
                    let done = self.work.at_mut(&at).map(|n| *n = neutral_operator());
                    self.taints.push(at);
                    return done.is_some();
                }
                // Otherwise cut out the nearest mapping entry.
                while matches!(at.last(), Some(Seg::Index(_))) {
                    at.pop();
                }
                if at.is_empty() {
                    return false;
                }
                let done = self.work.remove(&at);
                (at, done)
            }
        };
        if taint {
            self.taints.push(at);
        }
        done
    }
}

/// The one entry of the mapping at `path` that `err` is about, when serde
/// could not say (inside `type:`-tagged mappings it sees only the whole).
fn culprit(root: &Node, path: &[Seg], err: &DeError) -> Option<Path> {
    let Kind::Map(entries) = &root.at(path)?.kind else {
        return None;
    };
    let mut hits = entries.iter().filter(|e| match &e.value.kind {
        Kind::Scalar(_, raw) if !raw.is_empty() => {
            err.found.as_deref() == Some(raw.as_str()) || err.message.contains(&format!("'{raw}'"))
        }
        _ => false,
    });
    match (hits.next(), hits.next()) {
        (Some(e), None) => {
            let mut p = path.to_vec();
            p.push(Seg::Key(e.key.clone()));
            Some(p)
        }
        _ => None,
    }
}

/// Converts serde_path_to_error's path; an enum variant is a key (the tree
/// holds `source: {generator: ...}` as a mapping).
fn serde_path(p: &serde_path_to_error::Path) -> Path {
    use serde_path_to_error::Segment;
    let mut path = Vec::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => path.push(Seg::Index(*index)),
            Segment::Map { key } => path.push(Seg::Key(key.clone())),
            Segment::Enum { variant } => path.push(Seg::Key(variant.clone())),
            Segment::Unknown => break,
        }
    }
    path
}

/// What the enum at `path` is called in messages.
fn noun_for(path: &[Seg]) -> &'static str {
    match path {
        [.., Seg::Key(k), Seg::Index(_)] if k == "operators" => "operator",
        [.., Seg::Key(k)] if k == "source" => "source kind",
        [.., Seg::Key(k)] if k == "sink" => "sink kind",
        [.., Seg::Key(k)] if k == "format" => "format",
        _ => "kind",
    }
}

/// What to add for a missing required field at `path`.
fn missing_hint(path: &[Seg]) -> String {
    let key = match path.last() {
        Some(Seg::Key(k)) => k.as_str(),
        _ => "",
    };
    match path_string(path).as_str() {
        "apiVersion" => "add 'apiVersion: ferry.dev/v1'".into(),
        "kind" => "add 'kind: Job'".into(),
        "metadata" => "add 'metadata: {name: my-job}'".into(),
        "metadata.name" => "add 'name: my-job' (lowercase letters, digits and '-')".into(),
        "spec" => "add a 'spec' with at least a source and a sink".into(),
        "spec.source" => {
            "add e.g. 'source: {generator: {fields: {...}}}' or 'source: {file: {...}}'".into()
        }
        "spec.sink" => "add e.g. 'sink: {file: {path: ./out}}' or 'sink: {stdout: {}}'".into(),
        "spec.restartStrategy.type" => {
            format!("add 'type: ...' ({})", type_options::<RestartStrategy>())
        }
        p if key == "type" && p.starts_with("spec.source.generator.fields.") => {
            format!("add 'type: ...' ({})", type_options::<GeneratorField>())
        }
        _ => format!("add '{key}: ...' here"),
    }
}

/// The `type` values of an internally tagged enum, as serde knows them.
fn type_options<T: DeserializeOwned>() -> String {
    let probe = match read::read("type: \"\\u0001\"") {
        Read::Tree(n, _) => n,
        Read::Fatal(_) => return String::new(),
    };
    match T::deserialize(De(&probe)) {
        Err(DeError {
            kind: ErrorKind::UnknownVariant(_),
            message,
            ..
        }) => message,
        _ => String::new(),
    }
}

/// A stand-in for a required field that is missing or broken, so the rest of
/// the spec can still be checked (problems under it are not reported).
fn placeholder(path: &[Seg]) -> Option<Node> {
    let yaml = match path_string(path).as_str() {
        "apiVersion" => "ferry.dev/v1",
        "kind" => "Job",
        "metadata" => "{name: placeholder}",
        "spec" => "{source: {generator: {fields: {x: {type: sequence}}}}, sink: {blackhole: {}}}",
        "spec.source" => "{generator: {fields: {x: {type: sequence}}}}",
        "spec.sink" => "{blackhole: {}}",
        _ => return None,
    };
    match read::read(yaml) {
        Read::Tree(n, _) => Some(n),
        Read::Fatal(_) => None,
    }
}

fn neutral_operator() -> Node {
    match read::read("{filter: 'true'}") {
        Read::Tree(n, _) => n,
        Read::Fatal(_) => Node {
            pos: Pos::START,
            kind: Kind::Map(Vec::new()),
        },
    }
}

#[cfg(test)]
mod tests;

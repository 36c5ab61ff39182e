//! Parsing spec text (YAML or JSON) into a [`JobSpec`], with every problem
//! reported by field path and line/column.

use std::fmt;

use crate::spec::JobSpec;
use crate::spec::validate::output_schemas;

/// The text format of a spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecFormat {
    Yaml,
    Json,
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
/// form, without semantic checks.
pub fn parse_spec(text: &str) -> Result<JobSpec, SpecErrors> {
    // serde_yaml_ng only accepts `!tag` enums, so the document is first read
    // into a generic JSON value (JSON is YAML, so both formats take this path)
    // and the typed spec is deserialized from that, which accepts the
    // `source: {generator: {...}}` map form of enums.
    let value: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let loc = e.location();
        SpecErrors(vec![SpecError {
            path: String::new(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            message: e.to_string(),
        }])
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        SpecErrors(vec![SpecError {
            path: if path == "." { String::new() } else { path },
            line: None,
            column: None,
            message: e.into_inner().to_string(),
        }])
    })
}

/// Parses and validates a spec, returning every problem found.
pub fn parse_and_validate(text: &str) -> Result<JobSpec, SpecErrors> {
    let spec = parse_spec(text)?;
    match output_schemas(&spec) {
        Ok(_) => Ok(spec),
        Err(issues) => Err(SpecErrors(
            issues
                .into_iter()
                .map(|i| SpecError {
                    path: i.path,
                    line: None,
                    column: None,
                    message: i.message,
                })
                .collect(),
        )),
    }
}

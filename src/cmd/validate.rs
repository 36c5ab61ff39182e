//! `ferry validate FILE`: report every problem of a spec, one per line as
//! `FILE:LINE:COLUMN: PATH: MESSAGE` (the format editors and CI annotate
//! from), or as a JSON array with `--output json`.
//!
//! Exit status: 0 when the spec is valid, 2 when it is not or cannot be read.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_core::spec::{JobSpec, SpecError, parse_and_validate};

/// Exit status for an invalid or unreadable spec.
const EXIT_INVALID: u8 = 2;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Job spec file (YAML or JSON); `-` reads standard input.
    pub file: PathBuf,
    /// How to print the problems.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// `FILE:LINE:COLUMN: PATH: MESSAGE` lines and a summary.
    Text,
    /// A JSON array of `{file, line, column, path, message}`.
    Json,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let name = args.file.display().to_string();
    let bytes = match read_input(&args.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {name}: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let result = match std::str::from_utf8(&bytes) {
        Ok(text) => parse_and_validate(text).map_err(|e| e.0),
        Err(e) => Err(vec![not_utf8(&bytes, e.valid_up_to())]),
    };
    match (result, args.output) {
        (Ok(spec), OutputFormat::Text) => {
            println!("{name}: OK: {}", summary(&spec));
            Ok(ExitCode::SUCCESS)
        }
        (Ok(_), OutputFormat::Json) => {
            println!("[]");
            Ok(ExitCode::SUCCESS)
        }
        (Err(problems), OutputFormat::Text) => {
            for p in &problems {
                println!("{}", compiler_line(&name, p));
            }
            let n = problems.len();
            println!("{n} problem{}", if n == 1 { "" } else { "s" });
            Ok(ExitCode::from(EXIT_INVALID))
        }
        (Err(problems), OutputFormat::Json) => {
            let list: Vec<_> = problems
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "file": name,
                        "line": p.line,
                        "column": p.column,
                        "path": p.path,
                        "message": p.message,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

fn read_input(file: &Path) -> std::io::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(file)
    }
}

/// `FILE:LINE:COLUMN: PATH: MESSAGE`, leaving out what is unknown.
fn compiler_line(file: &str, p: &SpecError) -> String {
    let mut s = file.to_string();
    if let Some(l) = p.line {
        s.push_str(&format!(":{l}"));
        if let Some(c) = p.column {
            s.push_str(&format!(":{c}"));
        }
    }
    s.push_str(": ");
    if !p.path.is_empty() {
        s.push_str(&p.path);
        s.push_str(": ");
    }
    s.push_str(&p.message);
    s
}

/// The problem of a file that is not UTF-8, at its first bad byte.
fn not_utf8(bytes: &[u8], valid_up_to: usize) -> SpecError {
    let before = String::from_utf8_lossy(&bytes[..valid_up_to]);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    SpecError {
        path: String::new(),
        line: Some(line),
        column: Some(column),
        message: "the file is not UTF-8 text; save the spec as UTF-8 YAML or JSON".into(),
    }
}

/// `job 'x', parallelism 2, source generator, 3 operators, sink file`.
fn summary(spec: &JobSpec) -> String {
    let ops = spec.spec.operators.len();
    format!(
        "job '{}', parallelism {}, source {}, {ops} operator{}, sink {}",
        spec.metadata.name,
        spec.spec.parallelism,
        kind_of(&spec.spec.source),
        if ops == 1 { "" } else { "s" },
        kind_of(&spec.spec.sink),
    )
}

/// The name of an externally tagged enum's variant (`generator`, `file`),
/// as it is written in specs.
fn kind_of<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiler_line_leaves_out_an_empty_path() {
        let e = SpecError {
            path: String::new(),
            line: Some(3),
            column: Some(1),
            message: "m".into(),
        };
        assert_eq!(compiler_line("f.yaml", &e), "f.yaml:3:1: m");
        let e = SpecError {
            path: "spec.sink".into(),
            ..e
        };
        assert_eq!(compiler_line("f.yaml", &e), "f.yaml:3:1: spec.sink: m");
    }

    #[test]
    fn not_utf8_points_at_the_bad_byte() {
        let bytes = b"a: 1\nbb: \xff\n";
        let e = not_utf8(bytes, 9);
        assert_eq!((e.line, e.column), (Some(2), Some(5)));
    }
}

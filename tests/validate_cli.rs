//! `ferry validate` and `ferry schema` as a user runs them: the built binary
//! on spec files in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::OutputWithin;

const VALID: &str = r#"apiVersion: ferry.dev/v1
kind: Job
metadata:
  name: clicks-per-minute
spec:
  parallelism: 2
  checkpointing:
    interval: 1s
    retained: 3
  source:
    generator:
      total: 100000
      eventTime:
        step: 5ms
        maxOutOfOrderness: 2s
      fields:
        user: {type: key, cardinality: 100, prefix: "user-"}
        amount: {type: float, min: 0, max: 100}
  operators:
    - filter: "amount > 10.0"
    - key_by: user
    - window:
        tumbling: 1m
        aggregate:
          clicks: count
          total: sum(amount)
  sink:
    file:
      path: ./out/clicks-per-minute
"#;

const VALID_JSON: &str = r#"{
  "apiVersion": "ferry.dev/v1",
  "kind": "Job",
  "metadata": {"name": "json-job"},
  "spec": {
    "source": {"generator": {"fields": {"a": {"type": "sequence"}}}},
    "operators": [{"filter": "a > 1"}, {"filter": "a < 100"}],
    "sink": {"stdout": {}}
  }
}
"#;

/// A directory of spec files, removed on drop.
struct Specs {
    dir: tempfile::TempDir,
}

impl Specs {
    fn new() -> Self {
        Specs {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write spec");
        path
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output_within(common::COMMAND_LIMIT)
        .expect("run ferry")
}

fn validate(file: &Path, json: bool) -> Output {
    let file = file.to_str().unwrap();
    let out = if json {
        ferry(&["validate", file, "--output", "json"])
    } else {
        ferry(&["validate", file])
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "ferry panicked: {stderr}");
    out
}

/// (path, line) of every problem `ferry validate --output json` reports.
fn problems(file: &Path) -> Vec<(String, u64)> {
    let out = validate(file, true);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|p| {
            assert!(p["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(p["column"].as_u64().is_some());
            (
                p["path"].as_str().unwrap().to_string(),
                p["line"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Expected (path, line) of each problem.
type Located = Vec<(&'static str, u64)>;

/// `VALID` with `from` replaced by `to` (which must occur).
fn with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "test bug: {from:?} is not in VALID");
    VALID.replacen(from, to, 1)
}

#[test]
fn malformed_specs_are_reported_at_path_and_line() {
    let specs = Specs::new();
    let several = with("parallelism: 2", "parallelism: lots")
        .replacen("    retained: 3\n", "    retained: 3\n    retainer: 4\n", 1)
        .replacen("- key_by: user", "- keyBy: user", 1);
    let cases: Vec<(&str, String, Located)> = vec![
        (
            "syntax",
            with("- key_by: user", "- key_by: user: x"),
            vec![("spec.operators[1]", 21)],
        ),
        (
            "wrong-type",
            with("retained: 3", "retained: [3]"),
            vec![("spec.checkpointing.retained", 9)],
        ),
        (
            "unknown-field",
            with(
                "      total: 100000\n",
                "      total: 100000\n      totl: 5\n",
            ),
            vec![("spec.source.generator.totl", 13)],
        ),
        (
            "unknown-source",
            with("    generator:\n", "    kafka:\n"),
            vec![("spec.source.kafka", 11)],
        ),
        (
            "missing-sink",
            VALID[..VALID.find("  sink:").unwrap()].to_string(),
            vec![("spec.sink", 5)],
        ),
        (
            "bad-duration",
            with("step: 5ms", "step: 5 parsecs"),
            vec![("spec.source.generator.eventTime.step", 14)],
        ),
        (
            "window-without-key-by",
            with("    - key_by: user\n", ""),
            vec![("spec.operators[1].window", 21)],
        ),
        (
            "unknown-key-field",
            with("key_by: user", "key_by: [user, country]"),
            vec![("spec.operators[1].key_by", 21)],
        ),
        (
            "cel-syntax",
            with("amount > 10.0", "amount >"),
            vec![("spec.operators[0].filter", 20)],
        ),
        (
            "sum-of-string",
            with("sum(amount)", "sum(user)"),
            vec![("spec.operators[2].window.aggregate.total", 26)],
        ),
        (
            "sliding",
            with("tumbling: 1m", "sliding: {size: 1m, slide: 7s}"),
            vec![("spec.operators[2].window.sliding.size", 23)],
        ),
        (
            "metadata-name",
            with("name: clicks-per-minute", "name: 9lives"),
            vec![("metadata.name", 4)],
        ),
        (
            "several",
            several,
            vec![
                ("spec.parallelism", 6),
                ("spec.checkpointing.retainer", 10),
                ("spec.operators[1].keyBy", 22),
            ],
        ),
        (
            "json",
            VALID_JSON.replace("a < 100", "b < 100"),
            vec![("spec.operators[1].filter", 7)],
        ),
        (
            "json-syntax",
            VALID_JSON.replace("\"kind\": \"Job\",", "\"kind\": \"Job\""),
            vec![("", 4)],
        ),
    ];
    for (name, text, expected) in cases {
        let file = specs.write(&format!("{name}.yaml"), &text);
        let expected: Vec<(String, u64)> = expected
            .into_iter()
            .map(|(p, l)| (p.to_string(), l))
            .collect();
        assert_eq!(problems(&file), expected, "case {name}:\n{text}");
    }
}

#[test]
fn text_output_is_compiler_style_with_a_summary() {
    let specs = Specs::new();
    let file = specs.write(
        "two.yaml",
        with("parallelism: 2", "parallelism: 0").replacen("retained: 3", "retained: 0", 1),
    );
    let out = validate(&file, false);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let f = file.display();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("{f}:6:16: spec.parallelism: must be between 1 and 1024, found 0"),
            format!(
                "{f}:9:15: spec.checkpointing.retained: must be at least 1 (restore needs a checkpoint)"
            ),
            "2 problems".to_string(),
        ]
    );
}

/// Whatever is wrong with `spec.parallelism` — not a number, negative, or
/// out of range — the message states the same rule, at the field's path
/// and line.
#[test]
fn parallelism_problems_state_one_rule() {
    let specs = Specs::new();
    for (value, message) in [
        (
            "lots",
            "expected a whole number from 1 to 1024, found the text 'lots'",
        ),
        (
            "-3",
            "expected a whole number from 1 to 1024, found the number -3",
        ),
        ("0", "must be between 1 and 1024, found 0"),
        ("5000", "must be between 1 and 1024, found 5000"),
    ] {
        let file = specs.write(
            &format!("p{value}.yaml"),
            with("parallelism: 2", &format!("parallelism: {value}")),
        );
        let out = validate(&file, false);
        assert_eq!(out.status.code(), Some(2));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            stdout.lines().next(),
            Some(format!("{}:6:16: spec.parallelism: {message}", file.display()).as_str()),
            "parallelism: {value}"
        );
    }
}

#[test]
fn valid_specs_pass_with_a_summary() {
    let specs = Specs::new();
    let out = validate(&specs.write("ok.yaml", VALID), false);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.ends_with(
            "OK: job 'clicks-per-minute', parallelism 2, source generator, 3 operators, sink file\n"
        ),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1);

    let out = validate(&specs.write("ok.json", VALID_JSON), true);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        Value::Array(vec![])
    );
}

#[test]
fn unreadable_and_garbage_input_fail_cleanly() {
    let specs = Specs::new();
    let missing = specs.dir.path().join("missing.yaml");
    let out = validate(&missing, false);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read") && stderr.contains("missing.yaml"),
        "{stderr}"
    );

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let inputs: [(&str, Vec<u8>); 6] = [
        ("empty.yaml", Vec::new()),
        ("blank.yaml", b"\n\n   \n".to_vec()),
        ("garbage.bin", garbage),
        ("controls.yaml", b"\x00\x01\x02\x03".to_vec()),
        ("list.yaml", b"- 1\n- 2\n".to_vec()),
        (
            "deep.yaml",
            format!("a: {}", "[".repeat(50_000)).into_bytes(),
        ),
    ];
    for (name, bytes) in inputs {
        let file = specs.write(name, bytes);
        let found = problems(&file);
        assert!(!found.is_empty(), "{name}");
        assert!(
            found.iter().all(|(_, line)| *line >= 1),
            "{name}: {found:?}"
        );
    }
}

#[test]
fn schema_can_be_written_to_a_file() {
    let specs = Specs::new();
    let target = specs.dir.path().join("ferry-job.schema.json");
    let out = ferry(&["schema", "--output", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&target).unwrap()).unwrap();
    assert_eq!(schema["title"], "Ferry Job");
    assert_eq!(schema["$defs"]["Duration"]["type"], "string");

    let out = ferry(&["schema"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        schema
    );
}

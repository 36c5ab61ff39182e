//! One module per top-level command.

pub mod audit;
pub mod bench;
pub mod chaos;
pub mod cluster;
pub mod context;
pub mod drill;
pub mod job;
pub mod jobmanager;
pub mod local;
pub mod openapi;
pub mod process;
pub mod region;
pub mod sandbox;
pub mod schema;
pub mod taskmanager;
pub mod telemetry;
pub mod validate;

/// Sets up `tracing` on stderr: `FERRY_LOG` (or `RUST_LOG`) picks levels,
/// default `info` (the embedded state store's own chatter from `warn`);
/// `json` gives one JSON object per line. With
/// `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans also go to that OTLP collector
/// as service `service` ([`telemetry`]).
pub fn init_logging(format: &str, quiet_default: bool, service: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = if quiet_default {
        "warn"
    } else {
        "info,lsm_tree=error,fjall=warn"
    };
    let filter = std::env::var("FERRY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .map(EnvFilter::new)
        .unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = if format == "json" {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(telemetry::layer(service))
        .try_init();
}

/// How to run this `ferry` again, as a user can type it: `ferry` when that
/// name on `PATH` is this executable (after `cargo install --path .`),
/// otherwise this executable's path (e.g. `/home/me/ferry/target/release/ferry`
/// after `cargo run --release`), so a printed hint works when copy-pasted.
pub fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "ferry".to_string();
    };
    let exe_real = exe.canonicalize().unwrap_or_else(|_| exe.clone());
    // The first `ferry` on PATH is what a shell runs.
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("ferry"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) if p.canonicalize().is_ok_and(|p| p == exe_real) => "ferry".to_string(),
        _ => shell_quote(&exe.to_string_lossy()),
    }
}

/// `s` as one shell word: unchanged when it needs no quoting, otherwise in
/// single quotes.
pub fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@,%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_alone() {
        assert_eq!(shell_quote("/a/b-c_d.yaml"), "/a/b-c_d.yaml");
        assert_eq!(shell_quote("my job.yaml"), "'my job.yaml'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}

//! An S3-compatible server for the benchmarks that put regions a WAN
//! apart (`--rtt`): moto's S3 service served by waitress, an HTTP/1.1
//! server that keeps connections open. Over a distant link a request on a
//! kept connection then costs one round trip, as with a real object
//! store; moto's own `moto_server` closes every connection, which would
//! charge each request a handshake too.
//!
//! Both are Python packages from PyPI: `scripts/test.sh` installs them
//! into the project's `.venv`; elsewhere `python3 -m pip install
//! 'moto[server]' waitress`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_testkit::{try_free_port, wait_listening};

/// Keys and region: moto accepts any; real values never leave the machine.
const ACCESS_KEY: &str = "ferry-bench";
const SECRET_KEY: &str = "ferry-bench-secret";
const REGION: &str = "us-east-1";

/// moto under waitress on the port given as the first argument.
const SERVE: &str = r#"
import os, sys
port = int(sys.argv[1])
os.environ["MOTO_PORT"] = str(port)
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
import waitress
waitress.serve(DomainDispatcherApplication(create_backend_app), host="127.0.0.1", port=port, threads=16, _quiet=True)
"#;

/// An S3-compatible server on a free loopback port; ends when dropped.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python that has moto and waitress: `FERRY_BENCH_PYTHON`, the
/// project's `.venv`, or `python3` on PATH.
fn find_python() -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("FERRY_BENCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(".venv/bin/python"), PathBuf::from("python3")])
        .collect();
    for python in &candidates {
        let ok = Command::new(python)
            .args(["-c", "import moto.moto_server.werkzeug_app, waitress"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            // The server runs in its own directory: a relative path must
            // not be resolved from there, nor its symlinks (a venv's python
            // finds its packages by the path it was started as).
            return Ok(if python.components().count() > 1 {
                std::path::absolute(python).unwrap_or_else(|_| python.clone())
            } else {
                python.clone()
            });
        }
    }
    bail!(
        "an S3-compatible server is needed and none of {} has moto and waitress: run scripts/test.sh \
         (installs both into .venv), or `python3 -m pip install 'moto[server]' waitress`, \
         or set FERRY_BENCH_PYTHON to a Python that has them",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl S3Server {
    /// Starts the server with its log in `dir` and waits (up to 60 s: moto
    /// imports much of boto) until it listens.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let python = find_python()?;
        std::fs::create_dir_all(dir)?;
        let port = try_free_port()?;
        let log_path = dir.join("s3.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&python)
            .args(["-c", SERVE, &port.to_string()])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", python.display()))?;
        let mut server = Self { child, port };
        wait_listening(
            &mut server.child,
            "the S3 server (moto under waitress)",
            port,
            Some(&log_path),
            Duration::from_secs(60),
        )?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates `bucket` (reached at `endpoint`: this server or a link to
    /// it).
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("creating bucket {bucket} failed: {}", resp.status());
        }
        Ok(())
    }

    /// object_store's settings for this server reached at `endpoint`
    /// ([`StorageLocation::open_with`](ferry_core::storage::StorageLocation::open_with)).
    pub fn settings(endpoint: &str) -> Vec<(String, String)> {
        Self::env("", endpoint)
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect()
    }

    /// The same as environment variables, each name prefixed with
    /// `prefix` (a process's own store: no prefix; another region's
    /// store: `regions.storeCredentials`' `env:PREFIX`).
    pub fn env(prefix: &str, endpoint: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.to_string()))
        .collect()
    }
}

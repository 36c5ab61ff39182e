//! A real S3-compatible server for tests: moto's `moto_server` on a free
//! loopback port, killed (by its PID) on drop, with an `object_store` client
//! for it and the environment that points `ferry` at it.
//!
//! `scripts/test.sh` installs `moto[server]` into the project's `.venv`; a
//! test run without it tries that install itself, and if that fails the S3
//! tests fail (a test that tested nothing must not pass), unless
//! `FERRY_SKIP_S3=1` asks to skip them, which each says loudly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testkit::free_port;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

/// Region, keys: moto accepts any; real values never leave the machine.
pub const REGION: &str = "us-east-1";
const ACCESS_KEY: &str = "ferry-test";
const SECRET_KEY: &str = "ferry-test-secret";
/// How long moto may take to start (it imports much of boto on start).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long installing moto into the venv may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv that test tools live in (as in scripts/test.sh).
fn venv() -> PathBuf {
    std::env::var_os("FERRY_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"))
}

fn find_moto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let in_venv = venv().join("bin/moto_server");
    if in_venv.exists() {
        return Some(in_venv);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("moto_server"))
            .find(|p| p.exists())
    })
}

/// Runs a command to completion within `limit`; its output goes to `log`.
fn run_bounded(cmd: &mut Command, log: &Path, limit: Duration) -> Result<(), String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return if status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?} failed ({status}):\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ))
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Installs `moto[server]` into the venv, the way scripts/test.sh does.
fn install_moto() -> Result<PathBuf, String> {
    let venv = venv();
    let log = std::env::temp_dir().join(format!("ferry-moto-install-{}.log", std::process::id()));
    if !venv.join("bin/python").exists() {
        run_bounded(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            &log,
            INSTALL_TIMEOUT,
        )?;
    }
    run_bounded(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "moto[server]",
        ]),
        &log,
        INSTALL_TIMEOUT,
    )?;
    find_moto().ok_or_else(|| format!("pip succeeded but {venv:?}/bin/moto_server is missing"))
}

/// Where `moto_server` is, installing it if needed (once per test binary).
pub fn moto_binary() -> Result<PathBuf, String> {
    static FOUND: Mutex<Option<Result<PathBuf, String>>> = Mutex::new(None);
    let mut found = FOUND.lock().unwrap_or_else(|p| p.into_inner());
    found
        .get_or_insert_with(|| match find_moto() {
            Some(p) => Ok(p),
            None => {
                eprintln!(
                    "moto_server not found; installing moto[server] into {:?}",
                    venv()
                );
                install_moto()
            }
        })
        .clone()
}

/// A `moto_server` process on a free loopback port.
pub struct S3Server {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts moto. `None` means the S3 tests are skipped: moto cannot be
    /// installed here and `FERRY_SKIP_S3=1` asked for that (a loud message
    /// says so); without it, a missing moto fails the test.
    pub fn start() -> Option<Self> {
        let bin = match moto_binary() {
            Ok(b) => b,
            Err(why) => {
                let msg = format!(
                    "moto_server is not available and could not be installed: {why}\n\
                     Run scripts/test.sh (it installs moto[server] into .venv) or set FERRY_MOTO_SERVER."
                );
                if std::env::var_os("FERRY_SKIP_S3").is_none_or(|v| v != "1") {
                    panic!("the S3 tests cannot run: {msg}\n(set FERRY_SKIP_S3=1 to skip them)");
                }
                let bar = "!".repeat(72);
                eprintln!("\n{bar}\nS3 TESTS SKIPPED: {msg}\n{bar}\n");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin:?}: {e}"));
        let mut server = Self {
            child,
            port,
            _dir: dir,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("moto_server exited ({status}):\n{}", server.log());
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "moto_server did not listen on port {port} within {START_TIMEOUT:?}:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("moto.log")).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment that points `ferry` (object_store's `from_env`) here.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    /// Creates a bucket with a plain HTTP PUT.
    pub async fn create_bucket(&self, bucket: &str) {
        let resp = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .expect("PUT bucket");
        assert!(
            resp.status().is_success(),
            "creating bucket {bucket} failed: {}",
            resp.status()
        );
    }

    /// A client for one bucket.
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        self.store_at(&self.endpoint(), bucket)
    }

    /// A client for one bucket of this server reached at `endpoint` (e.g.
    /// through a proxy).
    pub fn store_at(&self, endpoint: &str, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_region(REGION)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .with_bucket_name(bucket)
                .build()
                .expect("S3 client"),
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

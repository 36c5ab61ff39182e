//! s3:// paths against a real S3-compatible server (moto, started by the
//! test on a loopback port): a bounded job reads its input from a bucket,
//! keeps its checkpoints there and commits its output there; it is
//! SIGKILLed once mid-run and resumed from the checkpoint in the bucket. The
//! committed output must equal the counts computed here from the input,
//! every manifest's sizes and SHA-256s must match the objects, and the
//! create-only put that guards a manifest must be refused by the server.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::clicks::*;
use common::s3::S3Server;
use common::*;
use ferry_core::manifest::Manifest;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

const BUCKET: &str = "ferry-it";

const SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: s3-clicks}
spec:
  parallelism: 2
  checkpointing: {interval: 100ms, retained: 2, storage: "s3://ferry-it/checkpoints"}
  restartStrategy: {type: fixed-attempts, attempts: 3, delay: 100ms}
  source:
    file:
      path: s3://ferry-it/in/*.jsonl
      format: jsonl
      schema: {user: string, ts: timestamp, amount: float}
      eventTime: {field: ts, maxOutOfOrderness: 1s}
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    file: {path: "s3://ferry-it/out"}
"#;

/// Every object below `prefix`, with its bytes.
async fn objects(store: &dyn ObjectStore, prefix: &str) -> Vec<(String, Bytes)> {
    let metas: Vec<_> = store
        .list(Some(&ObjPath::from(prefix)))
        .try_collect()
        .await
        .expect("list");
    let mut out = Vec::new();
    for m in metas {
        let data = store
            .get(&m.location)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("read");
        out.push((m.location.to_string(), data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Paths of the checkpoint manifests in the bucket.
async fn manifests(store: &dyn ObjectStore) -> Vec<String> {
    let metas: Vec<_> = store
        .list(Some(&ObjPath::from("checkpoints")))
        .try_collect()
        .await
        .expect("list checkpoints");
    metas
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|p| p.ends_with("/MANIFEST.json"))
        .collect()
}

#[test]
fn s3_input_checkpoints_and_output_stay_exactly_once_across_a_sigkill() {
    let Some(s3) = S3Server::start() else {
        return; // S3Server said loudly why.
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = s3.store(BUCKET);
    let data = generate(7, 2, 100_000, 20, 10);
    rt.block_on(async {
        s3.create_bucket(BUCKET).await;
        for (i, recs) in data.iter().enumerate() {
            store
                .put(
                    &ObjPath::from(format!("in/clicks-{i}.jsonl")),
                    PutPayload::from(jsonl(recs)),
                )
                .await
                .expect("upload input");
        }
    });
    let w = Workdir::new(SPEC);
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // First run: SIGKILL it as soon as a checkpoint is complete in the bucket.
    let mut child = w.spawn_local_env(&["--allow", "s3://ferry-it"], "run.log", &env);
    let start = Instant::now();
    while rt.block_on(manifests(store.as_ref())).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ferry exited before its first checkpoint:\n{}\nmoto:\n{}",
            w.log("run.log"),
            s3.log()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint in S3:\n{}",
            w.log("run.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended before the kill; make the input bigger"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let at_kill = rt.block_on(async {
        let mut read = 0;
        for path in manifests(store.as_ref()).await {
            let raw = store.get(&ObjPath::from(path)).await.unwrap();
            let m: Manifest = serde_json::from_slice(&raw.bytes().await.unwrap()).unwrap();
            assert!(!m.finished, "the job finished before the kill");
            read = read.max(m.records_in);
        }
        read
    });

    // Second run: resumes from the checkpoint in the bucket and finishes.
    let mut child = w.spawn_local_env(&["--allow", "s3://ferry-it"], "run.log", &env);
    let code = wait_exit(&mut child, Duration::from_secs(300));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}\nmoto:\n{}", s3.log());
    assert!(log.contains("resuming job 's3-clicks'"), "{log}");
    assert!(log.contains("restored from checkpoint"), "{log}");

    rt.block_on(async {
        // Committed output: the part files, read back from the bucket.
        let mut rows = Vec::new();
        for (path, bytes) in objects(store.as_ref(), "out").await {
            assert!(
                path.starts_with("out/part-") && path.ends_with(".jsonl"),
                "{path}"
            );
            for line in std::str::from_utf8(&bytes).unwrap().lines() {
                rows.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
            }
        }
        let got = count_rows(&rows, "user", "clicks");
        assert_eq!(got, expected(data.iter().flatten()), "S3 output differs");

        // Every manifest lists files whose sizes and SHA-256s match.
        let found = manifests(store.as_ref()).await;
        assert!(!found.is_empty());
        let mut finished = 0;
        for path in &found {
            let raw = store.get(&ObjPath::from(path.as_str())).await.unwrap();
            let m: Manifest = serde_json::from_slice(&raw.bytes().await.unwrap()).unwrap();
            let dir = path.trim_end_matches("MANIFEST.json");
            // Shared files (incremental checkpoints) are relative to the
            // job's directory, two levels up: `<job>/checkpoints/<n>/`.
            let job_dir = dir
                .trim_end_matches('/')
                .rsplitn(3, '/')
                .nth(2)
                .map(|d| format!("{d}/"))
                .unwrap();
            assert!(!m.files.is_empty(), "{path}");
            for f in &m.files {
                let at = if f.shared {
                    format!("{job_dir}{}", f.path)
                } else {
                    format!("{dir}{}", f.path)
                };
                let obj = store
                    .get(&ObjPath::from(at.as_str()))
                    .await
                    .unwrap_or_else(|e| panic!("{at} listed but unreadable: {e}"));
                let data = obj.bytes().await.unwrap();
                assert_eq!(data.len() as u64, f.size, "{at}");
                assert_eq!(ferry_core::storage::sha256_hex(&data), f.sha256, "{at}");
            }
            finished += m.finished as usize;
        }
        assert_eq!(finished, 1, "one final checkpoint among {found:?}");

        // The create-only put that writes a manifest: the server refuses to
        // replace an existing one (If-None-Match: *), and it stays intact.
        let path = ObjPath::from(found[0].as_str());
        let before = store.get(&path).await.unwrap().bytes().await.unwrap();
        let again = store
            .put_opts(
                &path,
                PutPayload::from_static(b"{}"),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "a create-only put over {path} was not refused: {again:?}"
        );
        let after = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(before, after);
        eprintln!(
            "S3: killed after a checkpoint at record {at_kill} of 200000, resumed, output exact; {} manifests verified",
            found.len()
        );
    });
}

const OUTAGE_SPEC: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata: {name: outage}
spec:
  parallelism: 1
  checkpointing:
    interval: 200ms
    retained: 2
    storage: "s3://ferry-outage/checkpoints"
    tolerableFailures: 1
  restartStrategy: {type: fixed-attempts, attempts: 2, delay: 100ms}
  source:
    generator:
      total: 30000
      rate: 3000
      fields: {n: {type: sequence}}
  sink:
    file: {path: ./out}
"#;

/// The store behind the checkpoints goes down (connections refused) for
/// longer than `tolerableFailures` checkpoints: the checkpoints fail, the
/// job restarts once, waits for the store to come back without using up
/// its restart attempts, restores, and finishes with every record exactly
/// once. No failed attempt's partial files stay behind.
#[test]
fn a_store_outage_delays_the_job_but_never_fails_it() {
    let Some(s3) = S3Server::start() else {
        return; // S3Server said loudly why.
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = s3.store("ferry-outage");
    let port: u16 = s3.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = rt.block_on(async {
        s3.create_bucket("ferry-outage").await;
        ferry_testkit::FaultProxy::start(port).await
    });
    let w = Workdir::new(OUTAGE_SPEC);
    let mut env = s3.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT");
    env.push(("AWS_ENDPOINT", proxy.http_url()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = w.spawn_local_env(&["--allow", "s3://ferry-outage"], "run.log", &env);
    wait_until(Duration::from_secs(60), "a checkpoint in the store", || {
        assert!(child.try_wait().unwrap().is_none(), "{}", w.log("run.log"));
        !rt.block_on(manifests(store.as_ref())).is_empty()
    });
    proxy.refuse();
    // Long enough for more than one checkpoint to fail and the restore to
    // find the store still down.
    wait_until(
        Duration::from_secs(60),
        "the job to wait for the store",
        || {
            w.log("run.log")
                .contains("waiting for the checkpoint store")
                || w.log("run.log")
                    .contains("cannot read the job's checkpoints")
        },
    );
    assert!(child.try_wait().unwrap().is_none(), "{}", w.log("run.log"));
    std::thread::sleep(Duration::from_secs(2)); // the outage goes on
    proxy.heal();
    let code = wait_exit(&mut child, Duration::from_secs(120));
    let log = w.log("run.log");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("checkpoints failed in a row"), "{log}");

    // Every record exactly once: the sequence 0..30000, computed here.
    assert_sequence_exactly_once(&w.output_rows("out"), "n", 30_000);

    // Checkpoint directories hold a manifest or an abort marker only.
    rt.block_on(async {
        let objs = objects(store.as_ref(), "checkpoints").await;
        let mut dirs: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (path, _) in &objs {
            let (dir, file) = path.rsplit_once('/').unwrap();
            let mut up = dir.rsplit('/');
            let is_checkpoint = up.next().is_some_and(|n| n.parse::<u64>().is_ok())
                && up.next() == Some("checkpoints");
            if is_checkpoint {
                dirs.entry(dir.to_string())
                    .or_default()
                    .push(file.to_string());
            }
        }
        assert!(!dirs.is_empty(), "no checkpoint directories");
        for (dir, files) in &dirs {
            let complete = files.iter().any(|f| f == "MANIFEST.json");
            let aborted = files == &vec![ferry_core::manifest::ABORTED_FILE.to_string()];
            assert!(
                complete || aborted,
                "{dir} holds a failed attempt's files: {files:?}"
            );
        }
    });
    eprintln!("store outage: job waited, restored and finished exactly once");
}

/// A standby region's store in another account: the primary's JobManager
/// opens it with `regions.storeCredentials` (`env:WEST_`: the `WEST_AWS_*`
/// variables) alone — its own `AWS_*` point at a dead endpoint with other
/// keys, and would fail every copy if they leaked in — and every
/// checkpoint of the job arrives in that bucket. No secret of either set
/// shows in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_store_with_credentials_of_its_own_receives_every_checkpoint() {
    use common::ha::Region;
    let Some(s3) = S3Server::start() else {
        return; // S3Server said loudly why.
    };
    const WEST_SECRET: &str = "west-only-s3cret-7731";
    const PROCESS_SECRET: &str = "process-s3cret-0042";
    s3.create_bucket("west").await;
    let nats = ferry_testkit::NatsServer::start();
    let mut r = Region::new(nats.url(), "800ms", "500ms").named("east");
    let own = format!("file://{}", r.storage().display());
    r.env = vec![
        (
            "FERRY_REGIONS_STORES",
            format!("east={own},west=s3://west/ferry"),
        ),
        ("FERRY_REGIONS_PRIMARY", "east".into()),
        ("FERRY_REGIONS_STORE_CREDENTIALS", "west=env:WEST_".into()),
        ("WEST_AWS_ENDPOINT", s3.endpoint()),
        ("WEST_AWS_ALLOW_HTTP", "true".into()),
        ("WEST_AWS_REGION", "us-east-1".into()),
        ("WEST_AWS_ACCESS_KEY_ID", "west-key".into()),
        ("WEST_AWS_SECRET_ACCESS_KEY", WEST_SECRET.into()),
        ("AWS_ENDPOINT", "http://127.0.0.1:1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "process-key".into()),
        ("AWS_SECRET_ACCESS_KEY", PROCESS_SECRET.into()),
    ];
    r.start("jm-a", None);
    r.start_tm("tm-1");
    let (leader, _) = r.leader(&[], Duration::from_secs(30)).await;
    let job = r.running_job(leader).await;
    let done = r.finished(leader, &job, Duration::from_secs(120)).await;
    r.check_output();

    // The job's newest checkpoint, as the primary wrote it, is in the
    // west bucket, manifest and all.
    let newest = r
        .manifest_epochs(&job)
        .keys()
        .next_back()
        .copied()
        .expect("a checkpoint");
    let west = s3.store("west");
    let start = Instant::now();
    loop {
        let names: Vec<String> = objects(west.as_ref(), &format!("ferry/jobs/{job}/"))
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if names
            .iter()
            .any(|k| k.ends_with("MANIFEST.json") && k.contains(&format!("/checkpoints/{newest}/")))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "checkpoint {newest} did not reach the west bucket; it holds {names:?}\n{}",
            r.log("jm-a")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in ["jm-a", "tm-1"] {
        let log = r.log(id);
        for secret in [WEST_SECRET, PROCESS_SECRET] {
            assert!(!log.contains(secret), "{id}'s log shows a secret:\n{log}");
        }
    }
    assert!(!done.to_string().contains(WEST_SECRET));
}

/// A state file larger than a part goes up as a multipart upload and comes
/// back through a local file, its bytes and SHA-256 intact: what a large
/// window state does at every full snapshot and every restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_file_goes_up_in_parts_and_comes_back_whole() {
    use ferry_core::storage::{PART_BYTES, StorageLocation, sha256_hex};
    let Some(s3) = S3Server::start() else {
        return; // S3Server said loudly why.
    };
    s3.create_bucket("parts").await;
    let loc = StorageLocation::with_store("s3://parts/ferry", s3.store("parts")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Parts that differ, and a short last one.
    let data: Vec<u8> = (0..PART_BYTES * 2 + 4321)
        .map(|i| (i / 4093 + i % 251) as u8)
        .collect();
    let src = dir.path().join("state");
    std::fs::write(&src, &data).unwrap();
    loc.put_file("shared/w-0-x.state", &src).await.unwrap();
    assert_eq!(
        loc.size("shared/w-0-x.state").await.unwrap(),
        Some(data.len() as u64)
    );
    let back = dir.path().join("back");
    let (size, sha) = loc
        .get_to_file("shared/w-0-x.state", &back)
        .await
        .unwrap()
        .expect("the object is there");
    assert_eq!(size, data.len() as u64);
    assert_eq!(sha, sha256_hex(&data));
    assert!(std::fs::read(&back).unwrap() == data, "bytes differ");
}

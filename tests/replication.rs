//! Checkpoint replication between two regions' stores on a real
//! S3-compatible server (moto on loopback): the standby's bucket is reached
//! through a TCP proxy that damages one state file in transit. The copy is
//! detected as wrong (read back and hashed, or refused by the server) and
//! written again, the manifest arrives last, and the standby restores the
//! checkpoint with every hash verified and every byte equal to the source.

mod common;

use bytes::Bytes;
use common::s3::S3Server;
use ferry_core::manifest::{
    FileEntry, MANIFEST_FORMAT, Manifest, SnapshotKind, checkpoint_dir, find_restorable,
    write_manifest,
};
use ferry_core::storage::{StorageLocation, sha256_hex};
use ferry_core::{CheckpointId, JobId};
use ferry_testkit::FaultProxy;

const MARKER: &[u8] = b"FERRY-IN-TRANSIT-MARKER";

/// Writes checkpoint `n` with two state files; the second carries MARKER.
async fn checkpoint(root: &StorageLocation, job: &JobId, n: u64) -> Vec<(String, Bytes)> {
    let dir = root.child(&checkpoint_dir(job, CheckpointId(n)));
    let mut a = vec![0u8; 200_000];
    for (i, b) in a.iter_mut().enumerate() {
        *b = (i * 31 + n as usize) as u8;
    }
    let mut b = format!("window state of checkpoint {n} ").into_bytes();
    b.extend_from_slice(MARKER);
    b.extend(std::iter::repeat_n(b'z', 50_000));
    let files = vec![
        ("window-0.state".to_string(), Bytes::from(a)),
        ("window-1.state".to_string(), Bytes::from(b)),
    ];
    let mut entries = Vec::new();
    for (subtask, (name, data)) in files.iter().enumerate() {
        dir.put(name, data.clone()).await.unwrap();
        entries.push(FileEntry {
            path: name.clone(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
            operator: "window".into(),
            subtask: subtask as u32,
            shared: false,
            chain: 0,
        });
    }
    write_manifest(
        &dir,
        &Manifest {
            format: MANIFEST_FORMAT,
            job_id: *job,
            job_name: "replicated".into(),
            checkpoint_id: CheckpointId(n),
            kind: SnapshotKind::Checkpoint,
            created_at: chrono::Utc::now(),
            jm_epoch: ferry_core::JmEpoch(3),
            region_epoch: ferry_core::RegionEpoch(1),
            parallelism: 2,
            watermark: 1_000 * n as i64,
            records_in: 100 * n,
            records_out: n,
            finished: false,
            duration_ms: 2,
            files: entries,
            source_offsets: Default::default(),
            sink_transactions: Vec::new(),
            restored_from: None,
        },
    )
    .await
    .unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_damaged_in_transit_is_detected_and_copied_again() {
    let Some(server) = S3Server::start() else {
        return;
    };
    server.create_bucket("primary").await;
    server.create_bucket("standby").await;
    let proxy = FaultProxy::start(server.port).await;
    let source =
        StorageLocation::with_store("s3://primary/ferry", server.store("primary")).unwrap();
    // The standby region's store, reached over the damaging link.
    let over_link = StorageLocation::with_store(
        "s3://standby/ferry",
        server.store_at(&proxy.http_url(), "standby"),
    )
    .unwrap();
    // The standby reading its own store directly.
    let standby =
        StorageLocation::with_store("s3://standby/ferry", server.store("standby")).unwrap();
    let job = JobId::default();
    source
        .put(
            &format!("jobs/{job}/spec.yaml"),
            Bytes::from_static(b"apiVersion: ferry.dev/v1\n"),
        )
        .await
        .unwrap();
    let files = checkpoint(&source, &job, 1).await;

    // An operator's copy: no region fence.
    let unfenced = ferry_region::WriteFence::unfenced();
    proxy.corrupt_once(MARKER);
    let copy = ferry_region::replicate_job(&source, &over_link, &job, &unfenced)
        .await
        .expect("replication succeeds after copying the damaged file again");
    assert_eq!(proxy.corrupted(), 1, "the proxy damaged one upload");
    let cp = copy.newest().expect("checkpoint 1 replicated");
    assert_eq!(cp.checkpoint, 1);
    assert_eq!(cp.files_copied, 2);
    assert_eq!(
        cp.retries, 1,
        "the damaged file was written again: {copy:?}"
    );
    assert!(copy.spec_copied);

    let restored = find_restorable(&standby, &job).await.unwrap();
    assert!(restored.skipped.is_empty(), "{:?}", restored.skipped);
    let got = restored.checkpoint.expect("the standby restores the copy");
    assert_eq!(got.manifest.checkpoint_id, CheckpointId(1));
    for (name, data) in &files {
        assert_eq!(&got.files[name], data, "{name} differs from the source");
    }

    // Incremental: the next pass copies only the new checkpoint.
    checkpoint(&source, &job, 2).await;
    let next = ferry_region::replicate_job(&source, &over_link, &job, &unfenced)
        .await
        .unwrap();
    let copied: Vec<(u64, usize, bool)> = next
        .copied
        .iter()
        .map(|c| (c.checkpoint, c.files_copied, c.already_complete))
        .collect();
    assert_eq!(copied, vec![(1, 0, true), (2, 2, false)]);
    assert_eq!(
        find_restorable(&standby, &job)
            .await
            .unwrap()
            .checkpoint
            .unwrap()
            .manifest
            .checkpoint_id,
        CheckpointId(2)
    );
}

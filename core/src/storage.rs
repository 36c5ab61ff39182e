//! Object-store access by URL (`file://`, plain paths, `s3://`, `gs://`,
//! `az://`, `memory://`), rooted at a prefix so every path inside Ferry's
//! layout stays relative and a copied tree works unchanged elsewhere.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// A root inside an object store; paths given to its methods are relative.
#[derive(Clone)]
pub struct StorageLocation {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

impl std::fmt::Debug for StorageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageLocation")
            .field("url", &self.url)
            .finish()
    }
}

/// The parts of a storage URL, checked without touching the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedUrl {
    pub scheme: String,
    /// Bucket or container (empty for files).
    pub bucket: String,
    /// Path inside the bucket, or the absolute local path for files.
    pub path: String,
}

impl StorageLocation {
    /// Checks a URL or plain path and splits it into scheme, bucket and path.
    pub fn parse(url: &str) -> Result<ParsedUrl> {
        let bad = |reason: &str| CoreError::StorageUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.trim().is_empty() {
            return Err(bad("empty; give a path or a URL like s3://bucket/prefix"));
        }
        if !url.contains("://") {
            let p = std::path::Path::new(url);
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| bad(&format!("cannot resolve relative path: {e}")))?
                    .join(p)
            };
            return Ok(ParsedUrl {
                scheme: "file".into(),
                bucket: String::new(),
                path: normalize(&abs.to_string_lossy()),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                let raw = url.trim_start_matches("file://");
                let p = std::path::Path::new(raw);
                let abs = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    std::env::current_dir()
                        .map_err(|e| bad(&e.to_string()))?
                        .join(p)
                };
                Ok(ParsedUrl {
                    scheme: "file".into(),
                    bucket: String::new(),
                    path: normalize(&abs.to_string_lossy()),
                })
            }
            s @ ("s3" | "gs" | "az" | "abfs" | "memory") => {
                let bucket = parsed.host_str().unwrap_or("").to_string();
                if bucket.is_empty() && s != "memory" {
                    return Err(bad("missing bucket, e.g. s3://my-bucket/prefix"));
                }
                Ok(ParsedUrl {
                    scheme: s.to_string(),
                    bucket,
                    path: parsed.path().trim_matches('/').to_string(),
                })
            }
            other => Err(bad(&format!(
                "unsupported scheme '{other}'; use file://, s3://, gs:// or az://"
            ))),
        }
    }

    /// Opens the store behind a URL. Cloud credentials and endpoints come from
    /// the usual environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, None)
    }

    /// Opens the store behind a URL with settings of its own (`own`:
    /// object_store's keys, e.g. `aws_access_key_id`, `aws_endpoint`)
    /// instead of the process environment — another account's bucket.
    /// `None`: the environment, as [`Self::open`].
    pub fn open_with(url: &str, own: Option<&[(String, String)]>) -> Result<Self> {
        let parsed = Self::parse(url)?;
        // Without a cloud store compiled in, nothing takes settings.
        #[cfg(not(any(feature = "s3", feature = "gcs", feature = "azure")))]
        let _ = own;
        #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
        let setting_err = |key: &str| CoreError::StorageUrl {
            url: url.to_string(),
            reason: format!("unknown store setting {key:?} in its credentials"),
        };
        // A cloud store's builder: from the environment, or from `own`
        // settings alone.
        #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
        macro_rules! builder {
            ($b:ty) => {
                match own {
                    None => <$b>::from_env(),
                    Some(settings) => {
                        let mut b = <$b>::new();
                        for (k, v) in settings {
                            b = b.with_config(k.parse().map_err(|_| setting_err(k))?, v);
                        }
                        b
                    }
                }
            };
        }
        let store_err = |e: object_store::Error| CoreError::StorageUrl {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match parsed.scheme.as_str() {
            "file" => {
                std::fs::create_dir_all(&parsed.path).map_err(|e| CoreError::StorageAccess {
                    url: url.to_string(),
                    reason: format!(
                        "cannot create directory {}: {e}; it must be a writable directory",
                        parsed.path
                    ),
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&parsed.path)
                    .map_err(store_err)?;
                (Arc::new(fs), Path::default())
            }
            "memory" => (
                Arc::new(object_store::memory::InMemory::new()),
                Path::from(parsed.path.as_str()),
            ),
            #[cfg(feature = "s3")]
            "s3" => {
                let s3 = builder!(object_store::aws::AmazonS3Builder)
                    .with_bucket_name(&parsed.bucket)
                    .build()
                    .map_err(store_err)?;
                (Arc::new(s3), Path::from(parsed.path.as_str()))
            }
            #[cfg(feature = "gcs")]
            "gs" => {
                let gcs = builder!(object_store::gcp::GoogleCloudStorageBuilder)
                    .with_bucket_name(&parsed.bucket)
                    .build()
                    .map_err(store_err)?;
                (Arc::new(gcs), Path::from(parsed.path.as_str()))
            }
            #[cfg(feature = "azure")]
            "az" | "abfs" => {
                let az = builder!(object_store::azure::MicrosoftAzureBuilder)
                    .with_container_name(&parsed.bucket)
                    .build()
                    .map_err(store_err)?;
                (Arc::new(az), Path::from(parsed.path.as_str()))
            }
            other => {
                return Err(CoreError::StorageUrl {
                    url: url.to_string(),
                    reason: format!(
                        "this build of ferry has no '{other}' support; rebuild with the matching cargo feature (s3, gcs, azure)"
                    ),
                });
            }
        };
        Ok(Self {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    /// A location on an already configured store (e.g. another region's S3
    /// endpoint and credentials, which the process environment cannot hold
    /// twice); `url` names it and gives the prefix.
    pub fn with_store(url: &str, store: Arc<dyn ObjectStore>) -> Result<Self> {
        let parsed = Self::parse(url)?;
        let prefix = match parsed.scheme.as_str() {
            "file" => Path::default(),
            _ => Path::from(parsed.path.as_str()),
        };
        Ok(Self {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    /// The local directory behind a `file://` location (`None` elsewhere).
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        let parsed = Self::parse(&self.url).ok()?;
        (parsed.scheme == "file").then(|| std::path::PathBuf::from(parsed.path))
    }

    /// The URL this location was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A location rooted at `rel` below this one (same store).
    pub fn child(&self, rel: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.full(rel),
            url: format!(
                "{}/{}",
                self.url.trim_end_matches('/'),
                rel.trim_matches('/')
            ),
        }
    }

    /// The location one level up: the inverse of [`Self::child`] with one
    /// segment (meant for locations made by `child`; at the store's root
    /// it stays itself).
    pub fn parent(&self) -> Self {
        let parts: Vec<_> = self.prefix.parts().collect();
        let Some((_, head)) = parts.split_last() else {
            return self.clone();
        };
        let prefix = Path::from_iter(head.iter().cloned());
        let url = match self.url.trim_end_matches('/').rsplit_once('/') {
            Some((head, _)) if !head.ends_with(':') && !head.ends_with("//") => head.to_string(),
            _ => self.url.clone(),
        };
        Self {
            store: self.store.clone(),
            prefix,
            url,
        }
    }

    /// The absolute store path of a relative path.
    pub fn full(&self, rel: &str) -> Path {
        let rel = rel.trim_matches('/');
        if rel.is_empty() {
            return self.prefix.clone();
        }
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    fn err(&self, rel: &str, source: object_store::Error) -> CoreError {
        CoreError::Store {
            path: format!("{}/{}", self.url.trim_end_matches('/'), rel),
            source,
        }
    }

    /// Writes (or overwrites) an object.
    pub async fn put(&self, rel: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.full(rel), PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(|e| self.err(rel, e))
    }

    /// Writes (or overwrites) an object from the local file `file`: a small
    /// one in one request, a large one in parts of [`PART_BYTES`] (a
    /// multipart upload, a few parts in flight), so that it never sits in
    /// memory whole. An upload that fails is aborted.
    pub async fn put_file(&self, rel: &str, file: &std::path::Path) -> Result<()> {
        use tokio::io::AsyncReadExt as _;
        let local = |e: std::io::Error| {
            CoreError::Other(format!(
                "reading {} to upload it to {}/{rel} failed: {e}",
                file.display(),
                self.url.trim_end_matches('/')
            ))
        };
        let size = tokio::fs::metadata(file).await.map_err(local)?.len();
        if size <= PART_BYTES as u64 {
            let data = tokio::fs::read(file).await.map_err(local)?;
            return self.put(rel, Bytes::from(data)).await;
        }
        let upload = self
            .store
            .put_multipart(&self.full(rel))
            .await
            .map_err(|e| self.err(rel, e))?;
        let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut f = tokio::fs::File::open(file).await.map_err(local)?;
        let mut buf = vec![0u8; PART_BYTES];
        let sent: Result<()> = async {
            loop {
                let mut n = 0;
                while n < buf.len() {
                    let got = f.read(&mut buf[n..]).await.map_err(local)?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                }
                if n == 0 {
                    return Ok(());
                }
                parts
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.err(rel, e))?;
                parts.write(&buf[..n]);
            }
        }
        .await;
        match sent {
            Ok(()) => parts
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.err(rel, e)),
            Err(e) => {
                let _ = parts.abort().await;
                Err(e)
            }
        }
    }

    /// Reads an object into the local file `file` as it arrives (never
    /// whole in memory); returns its size and SHA-256. `Ok(None)` if it
    /// does not exist.
    pub async fn get_to_file(
        &self,
        rel: &str,
        file: &std::path::Path,
    ) -> Result<Option<(u64, String)>> {
        use tokio::io::AsyncWriteExt as _;
        let local = |e: std::io::Error| {
            CoreError::Other(format!(
                "writing {}/{rel} to {} failed: {e}",
                self.url.trim_end_matches('/'),
                file.display()
            ))
        };
        let mut stream = match self.store.get(&self.full(rel)).await {
            Ok(r) => r.into_stream(),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(rel, e)),
        };
        let mut out =
            tokio::io::BufWriter::new(tokio::fs::File::create(file).await.map_err(local)?);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err(rel, e))?;
            size += chunk.len() as u64;
            // Hashing a chunk takes about as long as its write: fine on
            // the async worker at chunk size.
            hash.update(&chunk);
            out.write_all(&chunk).await.map_err(local)?;
        }
        out.flush().await.map_err(local)?;
        Ok(Some((size, hex::encode(hash.finalize()))))
    }

    /// Writes an object only if it does not exist. `Ok(false)` if it existed.
    pub async fn put_create(&self, rel: &str, data: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.full(rel), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Reads a whole object; `Ok(None)` if it does not exist.
    pub async fn get_opt(&self, rel: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.full(rel)).await {
            Ok(r) => r.bytes().await.map(Some).map_err(|e| self.err(rel, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Reads a whole object.
    pub async fn get(&self, rel: &str) -> Result<Bytes> {
        self.store
            .get(&self.full(rel))
            .await
            .map_err(|e| self.err(rel, e))?
            .bytes()
            .await
            .map_err(|e| self.err(rel, e))
    }

    /// Reads `range` bytes of an object.
    pub async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&self.full(rel), range)
            .await
            .map_err(|e| self.err(rel, e))
    }

    /// Size of an object, `None` if absent.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self.store.head(&self.full(rel)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Names of the immediate sub-directories of `rel`.
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        let base = self.full(rel);
        match self.store.list_with_delimiter(Some(&base)).await {
            Ok(res) => Ok(res
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Every object below `rel`, as (path relative to `rel`, size), sorted.
    pub async fn list_files(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_files_modified(rel)
            .await?
            .into_iter()
            .map(|(p, size, _)| (p, size))
            .collect())
    }

    /// Every object below `rel` with when it was last written, as (path
    /// relative to `rel`, size, last modified), sorted.
    pub async fn list_files_modified(
        &self,
        rel: &str,
    ) -> Result<Vec<(String, u64, chrono::DateTime<chrono::Utc>)>> {
        let base = self.full(rel);
        let base_str = base.to_string();
        let metas: Vec<_> = match self.store.list(Some(&base)).try_collect().await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(rel, e)),
        };
        let mut out: Vec<_> = metas
            .into_iter()
            .map(|m| {
                let full = m.location.to_string();
                let relp = full
                    .strip_prefix(&base_str)
                    .unwrap_or(&full)
                    .trim_start_matches('/')
                    .to_string();
                (relp, m.size, m.last_modified)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes one object; absent objects are fine.
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.store.delete(&self.full(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Deletes every object below `rel`: a checkpoint's `MANIFEST.json`
    /// first (a reader never finds a manifest whose files are gone), then
    /// the rest in one batch (one request per thousand objects on S3,
    /// instead of one each: over a WAN, deleting a checkpoint costs three
    /// round trips, not one per file).
    pub async fn delete_prefix(&self, rel: &str) -> Result<()> {
        let full = |p: String| {
            if rel.is_empty() {
                p
            } else {
                format!("{}/{}", rel.trim_matches('/'), p)
            }
        };
        let (manifests, rest): (Vec<_>, Vec<_>) = self
            .list_files(rel)
            .await?
            .into_iter()
            .map(|(p, _)| full(p))
            .partition(|p| p.rsplit('/').next() == Some("MANIFEST.json"));
        for m in manifests {
            self.delete(&m).await?;
        }
        let paths: Vec<object_store::Result<Path>> =
            rest.iter().map(|p| Ok(self.full(p))).collect();
        let mut deleted = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed());
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(rel, e)),
            }
        }
        if self.url.starts_with("file://") || !self.url.contains("://") {
            // Local directories stay behind as empty folders; remove them.
            if let Ok(parsed) = Self::parse(&self.url) {
                let dir = std::path::Path::new(&parsed.path).join(rel.trim_matches('/'));
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        Ok(())
    }
}

fn normalize(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Lowercase hex SHA-256 of `data`.
/// Part size of multipart uploads ([`StorageLocation::put_file`]): above
/// S3's 5 MiB minimum.
pub const PART_BYTES: usize = 8 << 20;

/// Parts of one upload sent at once.
const PARTS_IN_FLIGHT: usize = 4;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_paths() {
        let p = StorageLocation::parse("s3://bucket/a/b/").unwrap();
        assert_eq!(
            (p.scheme.as_str(), p.bucket.as_str(), p.path.as_str()),
            ("s3", "bucket", "a/b")
        );
        let f = StorageLocation::parse("file:///tmp/x/../y").unwrap();
        assert_eq!(f.path, "/tmp/y");
        assert!(StorageLocation::parse("ftp://host/x").is_err());
        assert!(StorageLocation::parse("s3:///nobucket").is_err());
        let rel = StorageLocation::parse("./data").unwrap();
        assert!(rel.path.starts_with('/') && rel.path.ends_with("/data"));
    }

    #[tokio::test]
    async fn parent_undoes_child() {
        let dir = tempfile::tempdir().unwrap();
        let root = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        let cp = root.child("jobs/j/checkpoints/7");
        let job = cp.parent().parent();
        assert_eq!(job.url(), root.child("jobs/j").url());
        job.put("shared/x", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(
            root.get("jobs/j/shared/x").await.unwrap(),
            Bytes::from_static(b"x")
        );
        assert_eq!(root.parent().url(), root.url());
    }

    /// Bytes that do not repeat at any part boundary.
    pub(crate) fn varied(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn a_large_file_goes_up_in_parts_and_comes_back_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().join("store").to_str().unwrap()).unwrap();
        // Two and a half parts, and one byte under a part (one request).
        for len in [PART_BYTES * 5 / 2, PART_BYTES - 1] {
            let data = varied(len);
            let src = dir.path().join("src");
            std::fs::write(&src, &data).unwrap();
            loc.put_file("x/state", &src).await.unwrap();
            assert_eq!(loc.get("x/state").await.unwrap(), Bytes::from(data.clone()));
            let back = dir.path().join("back");
            let (size, sha) = loc.get_to_file("x/state", &back).await.unwrap().unwrap();
            assert_eq!(size, len as u64);
            assert_eq!(sha, sha256_hex(&data));
            assert_eq!(std::fs::read(&back).unwrap(), data);
        }
        assert!(
            loc.get_to_file("absent", &dir.path().join("none"))
                .await
                .unwrap()
                .is_none()
        );
        let err = loc
            .put_file("y", &dir.path().join("no-such-file"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-file"), "{err}");
    }

    #[tokio::test]
    async fn create_only_put_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let loc = StorageLocation::open(dir.path().to_str().unwrap()).unwrap();
        assert!(
            loc.put_create("a/b.json", Bytes::from_static(b"1"))
                .await
                .unwrap()
        );
        assert!(
            !loc.put_create("a/b.json", Bytes::from_static(b"2"))
                .await
                .unwrap()
        );
        assert_eq!(loc.get("a/b.json").await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(loc.list_dirs("").await.unwrap(), vec!["a".to_string()]);
        assert_eq!(
            loc.list_files("a").await.unwrap(),
            vec![("b.json".to_string(), 1)]
        );
    }
}

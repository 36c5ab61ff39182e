//! Ferry's spilled window state on an embedded store: a window's entries are
//! `start (8 B, big-endian) | key` → `slot (4 B) | count (8 B)`. Four phases,
//! each timed: load N new keys in random order in batches of 10,000 (a full
//! write-back cache flushed), read-modify-write N/2 random keys (cache
//! misses), a point read of N/2 random keys from a snapshot while writes go
//! on, and a full ordered scan (a full checkpoint). Prints one JSON line.

use std::time::Instant;

const BATCH: usize = 10_000;

fn key(start: u64, k: u64, pad: usize) -> Vec<u8> {
    let mut v = start.to_be_bytes().to_vec();
    v.extend_from_slice(format!("customer-{k:0pad$}").as_bytes());
    v
}

/// A small xorshift: the same sequence on every run and for every store.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

trait Store {
    fn put_batch(&mut self, kv: &[(Vec<u8>, Vec<u8>)]);
    fn get(&self, k: &[u8]) -> Option<Vec<u8>>;
    /// Point reads from a snapshot taken now, with `writes` committed after it.
    fn snapshot_reads(&mut self, keys: &[Vec<u8>], writes: &[(Vec<u8>, Vec<u8>)]) -> usize;
    fn scan(&self) -> (usize, usize);
    fn disk(&self) -> u64;
}

#[cfg(feature = "fjall")]
mod fj {
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable};
    pub struct S(pub Database, pub Keyspace);
    pub fn open(dir: &std::path::Path, cache: u64) -> S {
        let db = Database::builder(dir)
            .cache_size(cache)
            .manual_journal_persist(true)
            .open()
            .unwrap();
        let ks = db.keyspace("w", KeyspaceCreateOptions::default).unwrap();
        S(db, ks)
    }
    impl super::Store for S {
        fn put_batch(&mut self, kv: &[(Vec<u8>, Vec<u8>)]) {
            let mut b = self.0.batch();
            for (k, v) in kv {
                b.insert(&self.1, k.as_slice(), v.as_slice());
            }
            b.commit().unwrap();
        }
        fn get(&self, k: &[u8]) -> Option<Vec<u8>> {
            self.1.get(k).unwrap().map(|v| v.to_vec())
        }
        fn snapshot_reads(&mut self, keys: &[Vec<u8>], writes: &[(Vec<u8>, Vec<u8>)]) -> usize {
            let snap = self.0.snapshot();
            self.put_batch(writes);
            keys.iter()
                .filter(|k| snap.get(&self.1, k.as_slice()).unwrap().is_some())
                .count()
        }
        fn scan(&self) -> (usize, usize) {
            let (mut n, mut b) = (0, 0);
            for kv in self.1.iter() {
                let (k, v) = kv.into_inner().unwrap();
                n += 1;
                b += k.len() + v.len();
            }
            (n, b)
        }
        fn disk(&self) -> u64 {
            self.0.disk_space().unwrap_or(0)
        }
    }
}

#[cfg(feature = "rocksdb")]
mod rk {
    use rocksdb::{DB, Options, WriteBatch, WriteOptions, ReadOptions};
    pub struct S(pub DB, pub std::path::PathBuf);
    pub fn open(dir: &std::path::Path, cache: u64) -> S {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_cache(&rocksdb::Cache::new_lru_cache(cache as usize));
        o.set_block_based_table_factory(&t);
        S(DB::open(&o, dir).unwrap(), dir.to_path_buf())
    }
    fn wo() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.disable_wal(false);
        w.set_sync(false);
        w
    }
    impl super::Store for S {
        fn put_batch(&mut self, kv: &[(Vec<u8>, Vec<u8>)]) {
            let mut b = WriteBatch::default();
            for (k, v) in kv {
                b.put(k, v);
            }
            self.0.write_opt(b, &wo()).unwrap();
        }
        fn get(&self, k: &[u8]) -> Option<Vec<u8>> {
            self.0.get(k).unwrap()
        }
        fn snapshot_reads(&mut self, keys: &[Vec<u8>], writes: &[(Vec<u8>, Vec<u8>)]) -> usize {
            let n = {
                let snap = self.0.snapshot();
                let mut b = WriteBatch::default();
                for (k, v) in writes {
                    b.put(k, v);
                }
                self.0.write_opt(b, &wo()).unwrap();
                keys.iter().filter(|k| snap.get(k).unwrap().is_some()).count()
            };
            n
        }
        fn scan(&self) -> (usize, usize) {
            let (mut n, mut b) = (0, 0);
            let mut ro = ReadOptions::default();
            ro.fill_cache(false);
            for kv in self.0.iterator_opt(rocksdb::IteratorMode::Start, ro) {
                let (k, v) = kv.unwrap();
                n += 1;
                b += k.len() + v.len();
            }
            (n, b)
        }
        fn disk(&self) -> u64 {
            fn du(p: &std::path::Path) -> u64 {
                std::fs::read_dir(p)
                    .map(|d| d.flatten().map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)).sum())
                    .unwrap_or(0)
            }
            du(&self.1)
        }
    }
}

fn rss_mb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5_000_000);
    let pad: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(12);
    let dir = std::path::PathBuf::from(args.get(3).cloned().unwrap_or("/tmp/state-store-bench".into()));
    let cache: u64 = 64 << 20;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    #[cfg(feature = "fjall")]
    let (name, mut s) = ("fjall", fj::open(&dir, cache));
    #[cfg(feature = "rocksdb")]
    let (name, mut s) = ("rocksdb", rk::open(&dir, cache));
    let start = 86_400_000u64;
    let val = |slot: u64, c: u64| {
        let mut v = (slot as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&c.to_le_bytes());
        v
    };
    // A random permutation of 0..n: the arrival order of keys.
    let mut order: Vec<u64> = (0..n).collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for i in (1..order.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let t = Instant::now();
    for (c, chunk) in order.chunks(BATCH).enumerate() {
        let kv: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| (key(start, *k, pad), val((c * BATCH + i) as u64, 1)))
            .collect();
        s.put_batch(&kv);
    }
    let load = t.elapsed().as_secs_f64();
    let m = n / 2;
    let t = Instant::now();
    let mut kv = Vec::with_capacity(BATCH);
    let mut missing = 0u64;
    for _ in 0..m {
        let k = key(start, rng.next() % n, pad);
        match s.get(&k) {
            Some(v) => {
                let c = u64::from_le_bytes(v[4..12].try_into().unwrap()) + 1;
                let mut nv = v[..4].to_vec();
                nv.extend_from_slice(&c.to_le_bytes());
                kv.push((k, nv));
            }
            None => missing += 1,
        }
        if kv.len() == BATCH {
            s.put_batch(&kv);
            kv.clear();
        }
    }
    s.put_batch(&kv);
    let rmw = t.elapsed().as_secs_f64();
    let keys: Vec<_> = (0..m).map(|_| key(start, rng.next() % n, pad)).collect();
    let writes: Vec<_> = (0..BATCH as u64).map(|i| (key(start, i, pad), val(i, 7))).collect();
    let t = Instant::now();
    let found = s.snapshot_reads(&keys, &writes);
    let snap = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (count, bytes) = s.scan();
    let scan = t.elapsed().as_secs_f64();
    assert_eq!(count as u64, n, "{name}: scan saw {count} of {n} keys");
    assert_eq!(missing, 0);
    assert_eq!(found as u64, m);
    println!(
        "{{\"store\":\"{name}\",\"keys\":{n},\"entry_bytes\":{},\"load_per_s\":{:.0},\"rmw_per_s\":{:.0},\"snapshot_get_per_s\":{:.0},\"scan_per_s\":{:.0},\"scan_mb_per_s\":{:.1},\"disk_mb\":{},\"peak_rss_mb\":{}}}",
        bytes / count,
        n as f64 / load,
        m as f64 / rmw,
        m as f64 / snap,
        n as f64 / scan,
        bytes as f64 / scan / 1e6,
        s.disk() >> 20,
        rss_mb()
    );
}

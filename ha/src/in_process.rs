//! The in-process coordination backend: one map behind a mutex, used by
//! `ferry local` (a single process needs no consensus) and by unit tests of
//! the lease and membership logic. Values expire after `max_age` like a NATS
//! KV bucket's.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::backend::{Coordination, Entry, Event, HaError, check_key};

struct Slot {
    entry: Entry,
    written: Instant,
}

struct State {
    map: BTreeMap<String, Slot>,
    revision: u64,
    /// Last revision of every key ever written (for CAS after delete/expiry).
    last: BTreeMap<String, u64>,
}

/// A coordination bucket inside this process.
pub struct InProcess {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    max_age: Duration,
}

impl InProcess {
    pub fn new(max_age: Duration) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            state: Mutex::new(State {
                map: BTreeMap::new(),
                revision: 0,
                last: BTreeMap::new(),
            }),
            events,
            max_age,
        }
    }

    fn live<'a>(&self, st: &'a State, key: &str) -> Option<&'a Slot> {
        st.map
            .get(key)
            .filter(|s| s.written.elapsed() < self.max_age)
    }

    fn write(&self, st: &mut State, key: &str, value: Bytes) -> u64 {
        st.revision += 1;
        let entry = Entry {
            key: key.to_string(),
            value,
            revision: st.revision,
            created: SystemTime::now(),
        };
        st.last.insert(key.to_string(), st.revision);
        st.map.insert(
            key.to_string(),
            Slot {
                entry: entry.clone(),
                written: Instant::now(),
            },
        );
        let _ = self.events.send(Event::Put(entry));
        st.revision
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Coordination for InProcess {
    async fn get(&self, key: &str) -> Result<Option<Entry>, HaError> {
        check_key(key)?;
        let st = lock(&self.state);
        Ok(self.live(&st, key).map(|s| s.entry.clone()))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        check_key(key)?;
        let mut st = lock(&self.state);
        if self.live(&st, key).is_some() {
            return Err(HaError::Exists(key.to_string()));
        }
        Ok(self.write(&mut st, key, value))
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, HaError> {
        check_key(key)?;
        let mut st = lock(&self.state);
        // Like JetStream: the expected revision is the key's last write,
        // whether or not it has since expired.
        if st.last.get(key).copied() != Some(revision) {
            return Err(HaError::WrongRevision(key.to_string(), revision));
        }
        Ok(self.write(&mut st, key, value))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64, HaError> {
        check_key(key)?;
        let mut st = lock(&self.state);
        Ok(self.write(&mut st, key, value))
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), HaError> {
        check_key(key)?;
        let mut st = lock(&self.state);
        if let Some(r) = revision
            && st.last.get(key).copied() != Some(r)
        {
            return Err(HaError::WrongRevision(key.to_string(), r));
        }
        st.revision += 1;
        let rev = st.revision;
        st.last.insert(key.to_string(), rev);
        st.map.remove(key);
        let _ = self.events.send(Event::Gone {
            key: key.to_string(),
            revision: rev,
        });
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, HaError> {
        let st = lock(&self.state);
        Ok(st
            .map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, s)| s.written.elapsed() < self.max_age)
            .map(|(_, s)| s.entry.clone())
            .collect())
    }

    async fn watch(&self, key: &str) -> Result<BoxStream<'static, Event>, HaError> {
        let rx = self.events.subscribe();
        let current = if key.ends_with('.') {
            self.list(key).await?
        } else {
            self.get(key).await?.into_iter().collect()
        };
        let want = key.to_string();
        let matches = move |k: &str| {
            if want.ends_with('.') {
                k.starts_with(&want)
            } else {
                k == want
            }
        };
        let initial = futures::stream::iter(current.into_iter().map(Event::Put));
        let updates = tokio_stream_from(rx).filter(move |e| {
            let k = match e {
                Event::Put(en) => en.key.as_str(),
                Event::Gone { key, .. } => key.as_str(),
            };
            futures::future::ready(matches(k))
        });
        Ok(initial.chain(updates).boxed())
    }

    fn max_age(&self) -> Duration {
        self.max_age
    }
}

/// A broadcast receiver as a stream (lagging watchers skip ahead).
fn tokio_stream_from(rx: broadcast::Receiver<Event>) -> BoxStream<'static, Event> {
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((e, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cas_semantics() {
        let kv = InProcess::new(Duration::from_secs(10));
        let r1 = kv.create("leader", Bytes::from("a")).await.unwrap();
        assert_eq!(
            kv.create("leader", Bytes::from("b")).await,
            Err(HaError::Exists("leader".into()))
        );
        let r2 = kv.update("leader", Bytes::from("c"), r1).await.unwrap();
        assert!(r2 > r1);
        assert!(matches!(
            kv.update("leader", Bytes::from("d"), r1).await,
            Err(HaError::WrongRevision(..))
        ));
        kv.delete("leader", Some(r2)).await.unwrap();
        assert_eq!(kv.get("leader").await.unwrap(), None);
        let r3 = kv.create("leader", Bytes::from("e")).await.unwrap();
        assert!(r3 > r2, "revisions grow across deletes");
        assert!(kv.put("bad key", Bytes::new()).await.is_err());
    }

    #[tokio::test]
    async fn values_expire() {
        let kv = InProcess::new(Duration::from_millis(50));
        kv.put("members.a", Bytes::from("1")).await.unwrap();
        assert_eq!(kv.list("members.").await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(kv.list("members.").await.unwrap().is_empty());
        kv.create("members.a", Bytes::from("2")).await.unwrap();
    }
}

//! Record keys: extraction from batches and the stable hash that decides
//! which subtask owns a key.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ferry_core::value::Value;
use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Column};

/// The key of a record under `key_by`.
#[derive(Clone, Debug, Eq, Serialize, Deserialize)]
pub enum Key {
    Int(i64),
    Str(Arc<str>),
    Other(Value),
    Multi(Box<[Value]>),
}

impl PartialEq for Key {
    // Written out so it inlines into hash-table probes (the hot path).
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Key::Int(a), Key::Int(b)) => a == b,
            (Key::Str(a), Key::Str(b)) => a == b,
            (Key::Other(a), Key::Other(b)) => a == b,
            (Key::Multi(a), Key::Multi(b)) => a == b,
            _ => false,
        }
    }
}

impl Hash for Key {
    // Consistent with `eq`; also decides which subtask owns a key, so it
    // must not change between versions that share checkpoints.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Key::Int(i) => {
                state.write_u8(0);
                i.hash(state)
            }
            Key::Str(s) => {
                state.write_u8(1);
                s.hash(state)
            }
            Key::Other(v) => {
                state.write_u8(2);
                v.hash(state)
            }
            Key::Multi(vs) => {
                state.write_u8(3);
                vs.hash(state)
            }
        }
    }
}

impl Key {
    /// Appends the key's field values to one builder per key field.
    pub fn push_values(&self, builders: &mut [crate::batch::ColumnBuilder]) {
        match self {
            Key::Int(i) => builders[0].push(Value::Int(*i)),
            Key::Str(s) => builders[0].push(Value::Str(s.clone())),
            Key::Other(v) => builders[0].push(v.clone()),
            Key::Multi(vs) => {
                for (b, v) in builders.iter_mut().zip(vs.iter()) {
                    b.push(v.clone());
                }
            }
        }
    }

    /// The key's field values, in key-field order.
    pub fn values(&self) -> Vec<Value> {
        match self {
            Key::Int(i) => vec![Value::Int(*i)],
            Key::Str(s) => vec![Value::Str(s.clone())],
            Key::Other(v) => vec![v.clone()],
            Key::Multi(v) => v.to_vec(),
        }
    }

    /// Roughly the heap memory the key holds (strings, key lists).
    pub fn heap_bytes(&self) -> usize {
        fn value(v: &Value) -> usize {
            match v {
                Value::Str(s) => 16 + s.len(),
                _ => 0,
            }
        }
        match self {
            Key::Int(_) => 0,
            Key::Str(s) => 16 + s.len(),
            Key::Other(v) => value(v),
            Key::Multi(vs) => {
                vs.len() * std::mem::size_of::<Value>() + vs.iter().map(value).sum::<usize>()
            }
        }
    }

    /// Stable across processes and builds of the same version.
    pub fn stable_hash(&self) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        self.hash(&mut h);
        // Finalize (FxHash's low bits are weak for small integers).
        let x = h.finish();
        splitmix(x)
    }
}

/// A strong 64-bit mix (SplitMix64 finalizer).
#[inline]
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Reads the key of row `i` from the key columns `idx`.
#[inline]
pub fn key_at(batch: &Batch, idx: &[usize], i: usize) -> Key {
    if idx.len() == 1 {
        match &batch.columns[idx[0]] {
            Column::Int(v) => Key::Int(v[i]),
            Column::Str(v) => Key::Str(v[i].clone()),
            c => match c.get(i) {
                Value::Int(x) => Key::Int(x),
                Value::Str(s) => Key::Str(s),
                other => Key::Other(other),
            },
        }
    } else {
        Key::Multi(idx.iter().map(|c| batch.columns[*c].get(i)).collect())
    }
}

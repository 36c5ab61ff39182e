//! Ferry's coordination layer: a small key-value trait with compare-and-set
//! ([`Coordination`]) and two implementations — NATS JetStream KV for real
//! deployments and an in-process map for `ferry local` and unit tests — plus
//! what is built on it: the leader lease whose KV revision is the fencing
//! [`Epoch`], and membership heartbeats.
//!
//! Invariant: ownership is decided only by compare-and-set, never by a read
//! that may be stale.

pub mod backend;
pub mod elector;
pub mod in_process;
pub mod membership;
pub mod nats;

pub use backend::{Coordination, Entry, Event, HaError};
pub use elector::{Elector, ElectorConfig, Epoch, LeaderInfo, Role, read_leader};
pub use membership::{Member, MemberView, Membership, MembershipConfig};

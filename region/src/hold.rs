//! A failover drill's hold: while a region-outage drill runs, the key
//! `drill-hold` in the global lease bucket names the standby the drill
//! wants to take over; every other standby stands aside for it. The hold
//! lasts `duration` from when each reader first saw it (on the reader's
//! clock), so a drill that dies midway blocks nobody for longer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_ha::{Coordination, HaError};
use serde::{Deserialize, Serialize};

/// Key of the hold in the global lease bucket.
pub const DRILL_HOLD: &str = "drill-hold";

/// What the hold key holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillHold {
    /// The region playing dead.
    pub from: String,
    /// The standby that is to take over.
    pub target: String,
    /// How long the hold lasts, in milliseconds.
    pub duration_ms: u64,
    /// Who started the drill (the REST caller); the target's takeover is
    /// theirs. Absent in holds written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

impl DrillHold {
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }
}

/// Writes the hold (a quorum write: a drill that cannot write it does not
/// start).
pub async fn set(global: &Arc<dyn Coordination>, hold: &DrillHold) -> Result<u64, HaError> {
    global
        .put(
            DRILL_HOLD,
            Bytes::from(serde_json::to_vec(hold).unwrap_or_default()),
        )
        .await
}

/// Removes the hold (the drill ended).
pub async fn clear(global: &Arc<dyn Coordination>) -> Result<(), HaError> {
    global.delete(DRILL_HOLD, None).await
}

/// The hold and its revision, if one is set and readable.
pub async fn read(global: &dyn Coordination) -> Result<Option<(DrillHold, u64)>, HaError> {
    Ok(global.get(DRILL_HOLD).await?.and_then(|e| {
        serde_json::from_slice::<DrillHold>(&e.value)
            .ok()
            .map(|h| (h, e.revision))
    }))
}

//! What a JobManager's `GET /v1/regions` says about the regions: the
//! primary and every region's leader URL from its heartbeat, for the
//! commands that must find the right region's JobManager (failover,
//! fail-back, drills).

use anyhow::{anyhow, bail};
use ferry_core::api::RegionsStatus;

/// The primary region and every known region's leader URL.
#[derive(Clone, Debug)]
pub struct RegionMap {
    pub status: RegionsStatus,
    pub primary: String,
}

impl RegionMap {
    /// The map of a `/v1/regions` answer; an error when it names no
    /// primary.
    pub fn from_status(status: RegionsStatus) -> anyhow::Result<Self> {
        let Some(primary) = status.primary.clone() else {
            bail!(
                "this JobManager knows no primary region: cross-region coordination is not configured (regions.global, see docs/config.md), or the region lease has not been read yet"
            );
        };
        Ok(Self { status, primary })
    }

    /// Checks that `region` is a known region.
    pub fn known(&self, region: &str) -> anyhow::Result<()> {
        if self.status.view(region).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = self
            .status
            .regions
            .iter()
            .map(|v| v.region.as_str())
            .collect();
        bail!(
            "unknown region '{region}': known regions are {}",
            known.join(", ")
        )
    }

    /// The REST URL of `region`'s leader, or why there is none.
    pub fn url(&self, region: &str) -> anyhow::Result<String> {
        self.known(region)?;
        self.status.api_url(region).map(str::to_string).ok_or_else(|| {
            anyhow!(
                "no JobManager URL is known for region {region} (it has not heartbeat into the global KV); is it running?"
            )
        })
    }
}

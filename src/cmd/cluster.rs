//! `ferry cluster status`: the region's HA state from any JobManager's
//! `/v1/cluster` — this instance's role, the leader and its epoch, every
//! member with its heartbeat age, and (from the leader) every TaskManager's
//! slots and jobs. `ferry cluster rebalance [--dry-run]`: even out the slot
//! load by moving jobs.

use std::process::ExitCode;

use super::job::{ApiArgs, client, show};

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the leader, its epoch and every member with its heartbeat age.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Even out the slot load over the TaskManagers: whole jobs move by
    /// stop-with-savepoint and restore from the most to the least loaded
    /// ones, while that lowers the load's spread. Prints the moves.
    Rebalance {
        /// Only print the moves; move nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(c: ClusterCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match c {
            ClusterCommand::Status { api } => {
                let call = client(&api)?.cluster().await;
                Ok(show(api.output, call, ferry_client::text::cluster))
            }
            ClusterCommand::Rebalance { dry_run, api } => {
                let call = client(&api)?.rebalance(dry_run).await;
                Ok(show(api.output, call, ferry_client::text::rebalance))
            }
        }
    })
}

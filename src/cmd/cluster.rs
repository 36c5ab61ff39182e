//! `ferry cluster status`: the region's HA state from any JobManager's
//! `/v1/cluster` — this instance's role, the leader and its epoch, and every
//! member with its heartbeat age.

use std::process::ExitCode;

use super::job::{ApiArgs, client, show};

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the leader, its epoch and every member with its heartbeat age.
    Status {
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
        }
    })
}

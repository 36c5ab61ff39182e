//! `ferry job submit|list|get|cancel|savepoint`: REST API client.

use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// List jobs.
    List,
}

pub fn run(_c: JobCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

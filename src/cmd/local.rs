//! `ferry local JOB`: run a job with an embedded JobManager and TaskManager.

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Job spec file (YAML or JSON).
    pub file: Option<std::path::PathBuf>,
}

pub fn run(_args: LocalArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

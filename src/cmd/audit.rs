//! `ferry audit`: the newest entries of the audit trail (`GET /v1/audit`):
//! who changed what, with which result, on which JobManager.

use std::process::ExitCode;

use super::job::{ApiArgs, client, show};

/// Options of `ferry audit`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// Entries to show, newest first (1 to 1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub fn run(a: AuditArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let call = client(&a.api)?.audit(usize::from(a.limit)).await;
        Ok(show(a.api.output, call, |l, out| {
            ferry_client::text::audit(&l.entries, out)
        }))
    })
}

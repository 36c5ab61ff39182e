//! `ferry openapi`: prints the OpenAPI document of the REST API (the one a
//! JobManager serves at `/openapi.json`), or the route table of
//! `docs/api.md` rendered from it, without a running server.

use std::process::ExitCode;

/// Flags of `ferry openapi`.
#[derive(clap::Args, Debug)]
pub struct OpenapiArgs {
    /// Print the Markdown route table of docs/api.md instead of the JSON document.
    #[arg(long)]
    pub markdown: bool,
}

pub fn run(args: OpenapiArgs) -> anyhow::Result<ExitCode> {
    if args.markdown {
        print!("{}", ferry_jobmanager::api::openapi_markdown());
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(ferry_jobmanager::api::openapi())?
        );
    }
    Ok(ExitCode::SUCCESS)
}

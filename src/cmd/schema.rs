//! `ferry schema`: print the JSON Schema of job specs.

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SchemaArgs {}

pub fn run(_args: SchemaArgs) -> anyhow::Result<ExitCode> {
    let schema = ferry_core::spec::JobSpec::json_schema();
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(ExitCode::SUCCESS)
}

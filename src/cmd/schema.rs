//! `ferry schema`: print (or write) the JSON Schema of job specs, for
//! editors' completion and checking of YAML and JSON specs.
//!
//! The schema is generated from the spec types, so it always describes what
//! `ferry validate` accepts in its canonical form (`source: {generator: ...}`,
//! durations as strings such as `10s`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct SchemaArgs {
    /// Write the schema to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(args: SchemaArgs) -> anyhow::Result<ExitCode> {
    let schema = ferry_core::spec::JobSpec::json_schema();
    let text = serde_json::to_string_pretty(&schema)? + "\n";
    match args.output {
        Some(path) => {
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write the schema to {}", path.display()))?;
            eprintln!("wrote the job spec schema to {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

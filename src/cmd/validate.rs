//! `ferry validate FILE`: report every problem of a spec.

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Job spec file (YAML or JSON).
    pub file: std::path::PathBuf,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)?;
    match ferry_core::spec::parse_and_validate(&text) {
        Ok(spec) => {
            println!("{}: valid job '{}'", args.file.display(), spec.metadata.name);
            Ok(ExitCode::SUCCESS)
        }
        Err(errs) => {
            eprintln!("{}: invalid job spec\n{errs}", args.file.display());
            Ok(ExitCode::from(2))
        }
    }
}

//! `ferry job submit|list|get|cancel|savepoint|checkpoints`: the JobManager
//! REST API (`docs/api.md`) through `ferry_client`, printing tables or the
//! server's JSON; and what every API command shares: `--url`, the
//! credentials, `--context` and `--output`, the client over them (through
//! [`super::context::target`]), and how an API failure is shown.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ferry_client::{Answer, Client, Error, text};

/// Exit code for an API error.
const EXIT_ERROR: u8 = 1;
/// Exit code for a spec the server rejected (as `ferry validate`).
const EXIT_INVALID_SPEC: u8 = 2;

/// Options every command that talks to a JobManager takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// JobManager REST URL. A comma-separated list (every JobManager of the
    /// region) is tried in order while a URL cannot be connected to or has
    /// no leader to forward a write to. [default: the context's url, else
    /// http://127.0.0.1:8081]
    #[arg(
        long,
        env = "FERRY_URL",
        value_delimiter = ',',
        value_name = "URL[,URL...]"
    )]
    pub url: Vec<String>,
    /// Bearer token for a JobManager with `api.auth` (prefer FERRY_TOKEN or
    /// --token-file: a flag's value shows in the process list).
    #[arg(
        long,
        env = "FERRY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// File whose first line is the bearer token.
    #[arg(
        long,
        env = "FERRY_TOKEN_FILE",
        conflicts_with = "token",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for `https://` JobManagers besides
    /// the public ones: the region's CA when `tls.api` uses a private one.
    #[arg(long, env = "FERRY_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Take the URL, CA and token this command is not given from this
    /// context of the contexts file (`ferry context`). [default: the
    /// file's current context]
    #[arg(long, env = "FERRY_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
    /// The contexts file. [default: ~/.config/ferry/contexts.yaml]
    #[arg(long, env = super::context::FILE_ENV, value_name = "FILE")]
    pub contexts_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// How results are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns and key: value blocks for people.
    Table,
    /// The server's JSON, pretty-printed, for scripts.
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobCommand {
    /// Submit a job spec file (YAML or JSON; `-` reads stdin).
    Submit {
        /// The job spec to submit: a YAML or JSON file, or `-` for
        /// standard input.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List jobs, newest first.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one job (by id, id prefix of 4+ characters, or name).
    Get {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a job, optionally taking a savepoint first.
    Cancel {
        id: String,
        /// Take a savepoint before stopping (resume it with
        /// `ferry local FILE --from-savepoint PATH`).
        #[arg(long)]
        savepoint: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a savepoint of a running job; the job keeps running.
    Savepoint {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a job's completed checkpoints and savepoints, newest first.
    Checkpoints {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub fn run(c: JobCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(c))
}

async fn run_async(c: JobCommand) -> anyhow::Result<ExitCode> {
    let result = match c {
        JobCommand::Submit { file, api } => {
            let (text, content_type) = read_spec(&file)?;
            let call = client(&api)?.submit(text, content_type).await;
            show(api.output, call, text::submitted)
        }
        JobCommand::List { api } => {
            let call = client(&api)?.jobs().await;
            show(api.output, call, |list, out| text::jobs(&list.jobs, out))
        }
        JobCommand::Get { id, api } => {
            let call = client(&api)?.job(&id).await;
            show(api.output, call, text::job)
        }
        JobCommand::Cancel { id, savepoint, api } => {
            let call = client(&api)?.cancel(&id, savepoint).await;
            show(api.output, call, text::cancelled)
        }
        JobCommand::Savepoint { id, api } => {
            let call = client(&api)?.savepoint(&id).await;
            show(api.output, call, text::savepoint)
        }
        JobCommand::Checkpoints { id, api } => {
            let call = client(&api)?.checkpoints(&id).await;
            show(api.output, call, |list, out| {
                text::checkpoints(&list.checkpoints, out)
            })
        }
    };
    Ok(result)
}

/// Prints an answer (the server's JSON, or `table`'s form of it) or the
/// failure; the exit code.
pub(crate) fn show<T>(
    output: Output,
    call: Result<Answer<T>, Error>,
    table: impl FnOnce(&T, &mut String),
) -> ExitCode {
    match call {
        Ok(a) => {
            print_result(output, &a.raw, |out| table(&a.value, out));
            ExitCode::SUCCESS
        }
        Err(e) => report_failure(&e),
    }
}

/// The spec text and the content type to send it with.
fn read_spec(file: &PathBuf) -> anyhow::Result<(Vec<u8>, Option<&'static str>)> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("cannot read the job spec from stdin")?;
        return Ok((buf, None));
    }
    let text =
        std::fs::read(file).with_context(|| format!("cannot read job spec {}", file.display()))?;
    let json = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    Ok((
        text,
        Some(if json {
            "application/json"
        } else {
            "application/yaml"
        }),
    ))
}

/// The context an API command used, for the note under a failure.
static USED_CONTEXT: std::sync::OnceLock<(String, PathBuf)> = std::sync::OnceLock::new();

/// The client of `--url` (or the context's URL), noting on stderr every
/// URL it skips.
pub(crate) fn client(args: &ApiArgs) -> anyhow::Result<Client> {
    let target = super::context::target(
        super::context::Explicit {
            url: args.url.clone(),
            token: args.token.clone(),
            token_file: args.token_file.clone(),
            ca_cert: args.ca_cert.clone(),
        },
        args.context.as_deref(),
        args.contexts_file.as_deref(),
    )?;
    if let Some(used) = &target.context {
        let _ = USED_CONTEXT.set(used.clone());
    }
    let mut c = Client::new(&target.urls)?.on_skip(Arc::new(|skipped, reason, base| {
        emit(
            &mut std::io::stderr(),
            &format!("note: {skipped} skipped ({reason}); answered by {base}\n"),
        )
    }));
    if let Some(t) = token(&target)? {
        c = c.with_token(&t);
    }
    if let Some(path) = &target.ca_cert {
        let from = &target.ca_from;
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read {from} {}", path.display()))?;
        c = c
            .with_ca_cert(&pem)
            .with_context(|| format!("{from} {}", path.display()))?;
    }
    Ok(c)
}

/// The token of `--token`/FERRY_TOKEN (or the context's `token`), or the
/// first line of `--token-file`/FERRY_TOKEN_FILE (or the context's
/// `tokenFile`).
fn token(target: &super::context::Target) -> anyhow::Result<Option<String>> {
    use super::context::TokenSource;
    let path = match &target.token {
        None => return Ok(None),
        Some(TokenSource::Inline(t)) => return Ok(Some(t.clone())),
        Some(TokenSource::File(path)) => path,
    };
    let from = &target.token_from;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {from} {}", path.display()))?;
    match text.lines().next().map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => Ok(Some(t.to_string())),
        None => anyhow::bail!(
            "{from} {}: the file is empty; put the token on its first line",
            path.display()
        ),
    }
}

// ---- Showing a failure ----

/// Prints a failed request as `error: ...` plus detail lines; the exit
/// code.
pub(crate) fn report_failure(e: &Error) -> ExitCode {
    let mut err = String::new();
    text::failure(e, &mut err);
    if let Some((name, file)) = USED_CONTEXT.get() {
        let _ = writeln!(
            err,
            "  (context '{name}' of {}; flags and their variables override it)",
            file.display()
        );
    }
    emit(&mut std::io::stderr(), &err);
    match e {
        Error::Api {
            url,
            status,
            body: Some(body),
            ..
        } => {
            tracing::debug!(%url, %status, code = %body.error.code, "API error");
            ExitCode::from(if body.error.code == "invalid_spec" {
                EXIT_INVALID_SPEC
            } else {
                EXIT_ERROR
            })
        }
        _ => ExitCode::from(EXIT_ERROR),
    }
}

// ---- Printing ----

/// Prints the server's JSON or the table form of a result to stdout.
pub(crate) fn print_result(
    output: Output,
    raw: &serde_json::Value,
    table: impl FnOnce(&mut String),
) {
    let mut out = String::new();
    match output {
        Output::Json => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(raw).unwrap_or_else(|_| raw.to_string())
            );
        }
        Output::Table => table(&mut out),
    }
    emit(&mut std::io::stdout(), &out);
}

/// Writes text out, ignoring a closed pipe (`ferry job list | head`).
fn emit(w: &mut impl std::io::Write, text: &str) {
    let _ = w.write_all(text.as_bytes()).and_then(|()| w.flush());
}

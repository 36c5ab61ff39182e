//! The CLI contexts file and `ferry context list|use|set|delete|show`:
//! named JobManager targets — REST URL(s), the CA to trust, the bearer
//! token or the file holding it — in `~/.config/ferry/contexts.yaml`
//! (`--contexts-file`, `FERRY_CONTEXTS_FILE`), one of them current. Also
//! owns how every API command picks its target ([`target`]): a flag or
//! its environment variable wins over the context (`--context`,
//! `FERRY_CONTEXT`, else the file's `current`), which wins over the
//! built-in default URL.
//!
//! Invariants: the file is written whole to a temporary file and renamed
//! into place, mode 0600; no command prints a token (`<redacted>`); a file
//! holding an inline token that others than its owner may read is refused,
//! as ssh refuses such a key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use ferry_client::DEFAULT_URL;
use serde::{Deserialize, Serialize};

use super::job::{Output, print_result};

/// The variable naming the contexts file.
pub const FILE_ENV: &str = "FERRY_CONTEXTS_FILE";

/// What a token is shown as.
const REDACTED: &str = "<redacted>";

/// The contexts file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContextsFile {
    /// The context commands use without `--context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Every context by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One named target.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    /// The JobManager REST URL(s): one string (commas allowed) or a list.
    pub url: Urls,
    /// CA certificate(s) (PEM) to trust for `https://` URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// A file whose first line is the bearer token (preferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (the file must then be private: mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("url", &self.url)
            .field("ca_cert", &self.ca_cert)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// A context's `url`: one string or a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    One(String),
    Many(Vec<String>),
}

impl Default for Urls {
    fn default() -> Self {
        Urls::Many(Vec::new())
    }
}

impl Urls {
    /// Every URL, commas split, blanks dropped.
    pub fn list(&self) -> Vec<String> {
        let all: Vec<&String> = match self {
            Urls::One(u) => vec![u],
            Urls::Many(v) => v.iter().collect(),
        };
        all.iter()
            .flat_map(|u| u.split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn from_list(mut urls: Vec<String>) -> Self {
        if urls.len() == 1 {
            Urls::One(urls.remove(0))
        } else {
            Urls::Many(urls)
        }
    }
}

/// A contexts file as read from `path` (empty when there is none).
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub exists: bool,
    pub file: ContextsFile,
}

/// `$XDG_CONFIG_HOME/ferry/contexts.yaml`, else
/// `~/.config/ferry/contexts.yaml`; `None` without either variable.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("ferry").join("contexts.yaml"))
}

/// The file `--contexts-file` names, else the default one.
fn file_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    match flag {
        Some(p) => Ok(p.to_path_buf()),
        None => default_path().ok_or_else(|| {
            anyhow::anyhow!(
                "no contexts file: neither HOME nor XDG_CONFIG_HOME is set; name one with --contexts-file FILE or {FILE_ENV}"
            )
        }),
    }
}

impl Loaded {
    /// Reads and checks the file at `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: path.to_path_buf(),
                    exists: false,
                    file: ContextsFile::default(),
                });
            }
            Err(e) => bail!("cannot read the contexts file {}: {e}", path.display()),
        };
        let file = parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if let Some(name) = file
            .contexts
            .iter()
            .find_map(|(n, c)| c.token.as_ref().map(|_| n))
        {
            check_private(path, name)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            exists: true,
            file,
        })
    }

    /// Names of every context, for messages.
    fn known(&self) -> String {
        if self.file.contexts.is_empty() {
            return format!(
                "{} defines none; create one with `ferry context set NAME --url URL`",
                self.path.display()
            );
        }
        let names: Vec<&str> = self.file.contexts.keys().map(String::as_str).collect();
        format!("contexts in {}: {}", self.path.display(), names.join(", "))
    }

    /// The context named `name`.
    pub fn named(&self, name: &str) -> anyhow::Result<(&str, &Context)> {
        match self.file.contexts.get_key_value(name) {
            Some((n, c)) => Ok((n.as_str(), c)),
            None => bail!("no context '{name}' ({})", self.known()),
        }
    }

    /// The context named `name`, else the current one, else none.
    pub fn select(&self, name: Option<&str>) -> anyhow::Result<Option<(&str, &Context)>> {
        let (name, why) = match (name, self.file.current.as_deref()) {
            (Some(n), _) => (n, "--context"),
            (None, Some(n)) => (n, "current"),
            (None, None) => return Ok(None),
        };
        if !self.exists && why == "--context" {
            bail!(
                "--context {name}: there is no contexts file at {}; create the context with `ferry context set {name} --url URL`",
                self.path.display()
            );
        }
        if why == "current" && !self.file.contexts.contains_key(name) {
            bail!(
                "the current context '{name}' of {} does not exist; pick one with `ferry context use NAME` ({})",
                self.path.display(),
                self.known()
            );
        }
        self.named(name).map(Some)
    }

    /// Writes the file: whole, to a temporary file renamed into place,
    /// mode 0600 (its directory 0700 when it is made).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = &self.path;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        create_private_dir(&dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        let yaml = serde_yaml_ng::to_string(&self.file)?;
        let text = format!(
            "# Ferry CLI contexts: `ferry context --help`. `ferry context` rewrites\n# this file (comments are not kept).\n{yaml}"
        );
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "contexts.yaml".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written =
            write_private(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            bail!("cannot write the contexts file {}: {e}", path.display());
        }
        // Make the rename durable (best effort: not every platform can).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Parses a contexts file's text and checks every context.
pub fn parse(text: &str) -> Result<ContextsFile, String> {
    let file: ContextsFile = if text.trim().is_empty() {
        ContextsFile::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            format!(
                "{e} (expected `current: NAME` and `contexts:` with, per name, `url` and optionally `caCert`, `tokenFile` or `token`)"
            )
        })?
    };
    for (name, c) in &file.contexts {
        if c.url.list().is_empty() {
            return Err(format!(
                "context '{name}' has no url; set one with `ferry context set {name} --url URL`"
            ));
        }
        if c.token.is_some() && c.token_file.is_some() {
            return Err(format!(
                "context '{name}' has both token and tokenFile; keep one (tokenFile is safer)"
            ));
        }
    }
    Ok(file)
}

#[cfg(unix)]
fn check_private(path: &Path, context: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read the permissions of {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} holds an inline token (context '{context}') but its mode is {:04o}, so others than its owner may read it: run `chmod 600 {}`, or move the token into a file named by tokenFile",
            path.display(),
            mode & 0o7777,
            path.display()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _context: &str) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// A path of the file: `~/` is the home directory; a relative path is
/// relative to the file's directory (as kubeconfig's are).
fn resolve_path(p: &Path, file: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if p.is_absolute() {
        return p.to_path_buf();
    }
    file.parent().unwrap_or(Path::new(".")).join(p)
}

// ---- Picking an API command's target ----

/// What the flags and their variables gave (`url` empty: not given).
#[derive(Clone, Debug, Default)]
pub struct Explicit {
    pub url: Vec<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
}

/// Where the bearer token comes from.
#[derive(Clone, PartialEq)]
pub enum TokenSource {
    /// `--token`/FERRY_TOKEN, or a context's `token`.
    Inline(String),
    /// `--token-file`/FERRY_TOKEN_FILE, or a context's `tokenFile`.
    File(PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            TokenSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// An API command's target.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub urls: Vec<String>,
    pub token: Option<TokenSource>,
    /// Says which flag or context gave it, for messages.
    pub token_from: String,
    pub ca_cert: Option<PathBuf>,
    pub ca_from: String,
    /// The context used, and its file.
    pub context: Option<(String, PathBuf)>,
}

/// Combines the flags with a context: each flag given wins over the
/// context's value; the default URL applies when neither gives one.
pub fn combine(e: Explicit, ctx: Option<(&str, &Context, &Path)>) -> Target {
    let mut t = Target {
        // An empty FERRY_URL gives no URL.
        urls: e.url.into_iter().filter(|u| !u.trim().is_empty()).collect(),
        token: match (e.token, e.token_file) {
            (Some(t), _) => Some(TokenSource::Inline(t)),
            (None, Some(f)) => Some(TokenSource::File(f)),
            (None, None) => None,
        },
        token_from: "--token-file".into(),
        ca_cert: e.ca_cert,
        ca_from: "--ca-cert".into(),
        context: None,
    };
    if let Some((name, c, file)) = ctx {
        t.context = Some((name.to_string(), file.to_path_buf()));
        if t.urls.is_empty() {
            t.urls = c.url.list();
        }
        if t.token.is_none() {
            t.token = match (&c.token, &c.token_file) {
                (Some(tok), _) => Some(TokenSource::Inline(tok.clone())),
                (None, Some(f)) => Some(TokenSource::File(resolve_path(f, file))),
                (None, None) => None,
            };
            t.token_from = format!("tokenFile of context '{name}'");
        }
        if t.ca_cert.is_none() {
            t.ca_cert = c.ca_cert.as_deref().map(|p| resolve_path(p, file));
            t.ca_from = format!("caCert of context '{name}'");
        }
    }
    if t.urls.is_empty() {
        t.urls = vec![DEFAULT_URL.to_string()];
    }
    t
}

/// The target of an API command: the flags, over the selected context of
/// the contexts file (when there is one).
pub fn target(
    e: Explicit,
    context: Option<&str>,
    contexts_file: Option<&Path>,
) -> anyhow::Result<Target> {
    let path = match file_path(contexts_file) {
        Ok(p) => p,
        Err(_) if context.is_none() => return Ok(combine(e, None)),
        Err(err) => return Err(err),
    };
    let loaded = Loaded::read(&path)?;
    let selected = loaded.select(context)?;
    Ok(combine(
        e,
        selected.map(|(n, c)| (n, c, loaded.path.as_path())),
    ))
}

// ---- `ferry context` ----

/// Options of `ferry context`.
#[derive(clap::Args, Debug)]
pub struct ContextArgs {
    #[command(subcommand)]
    pub command: ContextCommand,
    /// The contexts file [default: ~/.config/ferry/contexts.yaml, or
    /// $XDG_CONFIG_HOME/ferry/contexts.yaml].
    #[arg(long, env = FILE_ENV, global = true, value_name = "FILE")]
    pub contexts_file: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum ContextCommand {
    /// Every context; `*` marks the current one. Never shows a token.
    List {
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Make NAME the current context.
    Use { name: String },
    /// Create context NAME, or change the values given of an existing one.
    /// The token goes into a file named by --token-file (never onto the
    /// command line); the first context made becomes the current one.
    Set {
        name: String,
        /// JobManager REST URL(s), as for --url (required for a new
        /// context).
        #[arg(long, value_delimiter = ',', value_name = "URL[,URL...]")]
        url: Vec<String>,
        /// CA certificate(s) (PEM) to trust for `https://` URLs.
        #[arg(long, value_name = "FILE")]
        ca_cert: Option<PathBuf>,
        /// File whose first line is the bearer token.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Also make it the current context.
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Remove context NAME.
    Delete { name: String },
    /// One context's settings (default: the current one), tokens redacted.
    Show {
        name: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

pub fn run(a: ContextArgs) -> anyhow::Result<ExitCode> {
    let path = file_path(a.contexts_file.as_deref())?;
    let mut loaded = Loaded::read(&path)?;
    match a.command {
        ContextCommand::List { output } => {
            list(&loaded, output);
        }
        ContextCommand::Use { name } => {
            let (name, c) = loaded.named(&name)?;
            let (name, urls) = (name.to_string(), c.url.list().join(","));
            loaded.file.current = Some(name.clone());
            loaded.save()?;
            println!("now using context '{name}' ({urls})");
        }
        ContextCommand::Set {
            name,
            url,
            ca_cert,
            token_file,
            make_current,
        } => set(&mut loaded, name, url, ca_cert, token_file, make_current)?,
        ContextCommand::Delete { name } => {
            if loaded.file.contexts.remove(&name).is_none() {
                bail!("no context '{name}' ({})", loaded.known());
            }
            let was_current = loaded.file.current.as_deref() == Some(name.as_str());
            if was_current {
                loaded.file.current = None;
            }
            loaded.save()?;
            println!(
                "deleted context '{name}' from {}{}",
                loaded.path.display(),
                if was_current {
                    "; it was the current one: pick another with `ferry context use NAME`"
                } else {
                    ""
                }
            );
        }
        ContextCommand::Show { name, output } => {
            let Some((name, c)) = loaded.select(name.as_deref())? else {
                bail!(
                    "no current context in {}; name one (`ferry context show NAME`) or pick one with `ferry context use NAME`",
                    loaded.path.display()
                );
            };
            let current = loaded.file.current.as_deref() == Some(name);
            let raw = shown(name, c, current, &loaded.path);
            print_result(output, &raw, |out| {
                let _ = writeln!(
                    out,
                    "# context '{name}'{} of {}",
                    if current { " (current)" } else { "" },
                    loaded.path.display()
                );
                let yaml = serde_yaml_ng::to_string(&redacted(c)).unwrap_or_default();
                out.push_str(&yaml);
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `c` with its token replaced by `<redacted>`.
fn redacted(c: &Context) -> Context {
    let mut c = c.clone();
    if c.token.is_some() {
        c.token = Some(REDACTED.into());
    }
    c
}

/// A context as JSON for `-o json`, token redacted, paths as resolved.
fn shown(name: &str, c: &Context, current: bool, file: &Path) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "current": current,
        "url": c.url.list(),
        "caCert": c.ca_cert.as_deref().map(|p| resolve_path(p, file)),
        "tokenFile": c.token_file.as_deref().map(|p| resolve_path(p, file)),
        "token": c.token.as_ref().map(|_| REDACTED),
    })
}

fn list(loaded: &Loaded, output: Output) {
    let current = loaded.file.current.as_deref();
    let raw = serde_json::json!({
        "file": loaded.path,
        "current": current,
        "contexts": loaded.file.contexts.iter()
            .map(|(n, c)| shown(n, c, current == Some(n.as_str()), &loaded.path))
            .collect::<Vec<_>>(),
    });
    print_result(output, &raw, |out| {
        if loaded.file.contexts.is_empty() {
            let _ = writeln!(
                out,
                "no contexts in {}; create one with `ferry context set NAME --url URL [--ca-cert FILE] [--token-file FILE]`",
                loaded.path.display()
            );
            return;
        }
        let rows: Vec<[String; 5]> = loaded
            .file
            .contexts
            .iter()
            .map(|(n, c)| {
                let path = |p: &Option<PathBuf>| {
                    p.as_deref()
                        .map(|p| resolve_path(p, &loaded.path).display().to_string())
                };
                [
                    if current == Some(n.as_str()) { "*" } else { "" }.to_string(),
                    n.clone(),
                    c.url.list().join(","),
                    path(&c.ca_cert).unwrap_or_else(|| "-".into()),
                    match (&c.token, path(&c.token_file)) {
                        (Some(_), _) => format!("inline {REDACTED}"),
                        (None, Some(f)) => format!("file {f}"),
                        (None, None) => "-".into(),
                    },
                ]
            })
            .collect();
        let head = ["CURRENT", "NAME", "URL", "CA CERT", "TOKEN"];
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..5).map(width).collect();
        let line = |cells: [&str; 5], out: &mut String| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
            let _ = writeln!(out, "{}", l.trim_end());
        };
        line(head, out);
        for r in &rows {
            line(
                [
                    r[0].as_str(),
                    r[1].as_str(),
                    r[2].as_str(),
                    r[3].as_str(),
                    r[4].as_str(),
                ],
                out,
            );
        }
    });
}

/// A file path given on the command line, made absolute (the context is
/// used from other directories) and checked to exist.
fn given_file(flag: &str, p: PathBuf) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(&p).with_context(|| format!("{flag} {}", p.display()))?;
    if !abs.is_file() {
        bail!("{flag} {}: no such file", abs.display());
    }
    Ok(abs)
}

fn set(
    loaded: &mut Loaded,
    name: String,
    url: Vec<String>,
    ca_cert: Option<PathBuf>,
    token_file: Option<PathBuf>,
    make_current: bool,
) -> anyhow::Result<()> {
    if name.trim().is_empty() || name.trim() != name {
        bail!("context name {name:?}: give a name without surrounding blanks");
    }
    let urls: Vec<String> = url
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(ferry_client::normalize_url)
        .collect::<anyhow::Result<_>>()?;
    let ca_cert = ca_cert.map(|p| given_file("--ca-cert", p)).transpose()?;
    let token_file = token_file
        .map(|p| given_file("--token-file", p))
        .transpose()?;
    let existed = loaded.file.contexts.contains_key(&name);
    if !existed && urls.is_empty() {
        bail!("context '{name}' is new: give its JobManager URL with --url URL");
    }
    let c = loaded.file.contexts.entry(name.clone()).or_default();
    let mut notes = Vec::new();
    if !urls.is_empty() {
        c.url = Urls::from_list(urls);
    }
    if let Some(p) = ca_cert {
        c.ca_cert = Some(p);
    }
    if let Some(p) = token_file {
        if c.token.take().is_some() {
            notes.push("its inline token was removed: the token file replaces it");
        }
        c.token_file = Some(p);
    }
    let first = loaded.file.current.is_none();
    if make_current || first {
        loaded.file.current = Some(name.clone());
    }
    loaded.save()?;
    println!(
        "{} context '{name}' in {}{}",
        if existed { "updated" } else { "created" },
        loaded.path.display(),
        if loaded.file.current.as_deref() == Some(name.as_str()) {
            " (current)"
        } else {
            ""
        }
    );
    for n in notes {
        println!("  {n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
current: prod
contexts:
  prod:
    url: https://jm-0.example:8081,https://jm-1.example:8081
    caCert: ca.crt
    tokenFile: /secrets/prod.token
  dev:
    url: [http://127.0.0.1:8081]
";

    fn ctx(file: &ContextsFile, name: &str) -> Context {
        file.contexts[name].clone()
    }

    #[test]
    fn a_file_parses_with_either_url_form_and_rejects_unknown_keys_with_the_line() {
        let f = parse(FILE).unwrap();
        assert_eq!(f.current.as_deref(), Some("prod"));
        assert_eq!(
            ctx(&f, "prod").url.list(),
            ["https://jm-0.example:8081", "https://jm-1.example:8081"]
        );
        assert_eq!(ctx(&f, "dev").url.list(), ["http://127.0.0.1:8081"]);
        assert_eq!(parse("").unwrap(), ContextsFile::default());
        let e = parse("contexts:\n  prod:\n    url: x\n    tokenfile: y\n").unwrap_err();
        assert!(e.contains("unknown field `tokenfile`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let e = parse("contexts:\n  prod:\n    caCert: x\n").unwrap_err();
        assert!(e.contains("missing field `url`"), "{e}");
        let e = parse("contexts:\n  prod:\n    url: ''\n").unwrap_err();
        assert!(e.contains("context 'prod' has no url"), "{e}");
        let e = parse("contexts:\n  p:\n    url: u\n    token: t\n    tokenFile: f\n").unwrap_err();
        assert!(e.contains("both token and tokenFile"), "{e}");
    }

    #[test]
    fn flags_win_over_the_context_which_wins_over_the_default() {
        let f = parse(FILE).unwrap();
        let prod = ctx(&f, "prod");
        let file = Path::new("/home/me/.config/ferry/contexts.yaml");
        // Nothing given: the context's values; its relative caCert is
        // relative to the file.
        let t = combine(Explicit::default(), Some(("prod", &prod, file)));
        assert_eq!(t.urls.len(), 2);
        assert_eq!(
            t.ca_cert.as_deref(),
            Some(Path::new("/home/me/.config/ferry/ca.crt"))
        );
        assert_eq!(
            t.token,
            Some(TokenSource::File("/secrets/prod.token".into()))
        );
        assert_eq!(t.context, Some(("prod".into(), file.to_path_buf())));
        // Each flag given wins, alone; the rest still come from the context.
        let t = combine(
            Explicit {
                url: vec!["http://other:1".into()],
                token: Some("tok".into()),
                ..Default::default()
            },
            Some(("prod", &prod, file)),
        );
        assert_eq!(t.urls, ["http://other:1"]);
        assert_eq!(t.token, Some(TokenSource::Inline("tok".into())));
        assert_eq!(
            t.ca_cert.as_deref(),
            Some(Path::new("/home/me/.config/ferry/ca.crt"))
        );
        let t = combine(
            Explicit {
                token_file: Some("/mine".into()),
                ca_cert: Some("/my-ca".into()),
                ..Default::default()
            },
            Some(("prod", &prod, file)),
        );
        assert_eq!(t.token, Some(TokenSource::File("/mine".into())));
        assert_eq!(t.ca_cert.as_deref(), Some(Path::new("/my-ca")));
        assert_eq!(t.urls.len(), 2);
        // No context: the built-in default URL, nothing else.
        let t = combine(Explicit::default(), None);
        assert_eq!(t.urls, [DEFAULT_URL]);
        assert_eq!((t.token, t.ca_cert, t.context), (None, None, None));
    }

    #[test]
    fn selection_names_the_file_and_the_known_contexts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contexts.yaml");
        std::fs::write(&path, FILE).unwrap();
        let l = Loaded::read(&path).unwrap();
        assert_eq!(l.select(None).unwrap().unwrap().0, "prod");
        assert_eq!(l.select(Some("dev")).unwrap().unwrap().0, "dev");
        let e = l.select(Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no context 'nope'"), "{e}");
        assert!(e.contains("dev, prod"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        // A current context that is gone says how to pick another.
        std::fs::write(&path, "current: gone\ncontexts: {}\n").unwrap();
        let e = Loaded::read(&path)
            .unwrap()
            .select(None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'gone'") && e.contains("ferry context use"),
            "{e}"
        );
        // No file: no context, unless one is asked for.
        let none = Loaded::read(&dir.path().join("missing.yaml")).unwrap();
        assert!(none.select(None).unwrap().is_none());
        let e = none.select(Some("prod")).unwrap_err().to_string();
        assert!(e.contains("no contexts file"), "{e}");
        // A malformed file: its path and the line.
        std::fs::write(&path, "current: x\ncontexts:\n  a: [\n").unwrap();
        let e = Loaded::read(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("line"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn saving_is_private_and_an_inline_token_in_a_readable_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("contexts.yaml");
        let mut l = Loaded::read(&path).unwrap();
        l.file.contexts.insert(
            "p".into(),
            Context {
                url: Urls::One("http://a:1".into()),
                token: Some("s3cret".into()),
                ..Default::default()
            },
        );
        l.file.current = Some("p".into());
        l.save().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["contexts.yaml"]);
        let again = Loaded::read(&path).unwrap();
        assert_eq!(again.file, l.file);
        assert!(!format!("{again:?}").contains("s3cret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Loaded::read(&path).unwrap_err().to_string();
        assert!(e.contains("inline token (context 'p')"), "{e}");
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        // A readable file without inline tokens is fine.
        std::fs::write(&path, FILE).unwrap();
        assert!(Loaded::read(&path).is_ok());
    }

    #[test]
    fn shown_contexts_never_carry_the_token() {
        let c = Context {
            url: Urls::One("http://a:1".into()),
            token: Some("s3cret".into()),
            ..Default::default()
        };
        let v = shown("p", &c, true, Path::new("/x/contexts.yaml"));
        assert_eq!(v["token"], REDACTED);
        let yaml = serde_yaml_ng::to_string(&redacted(&c)).unwrap();
        assert!(
            !yaml.contains("s3cret") && yaml.contains(REDACTED),
            "{yaml}"
        );
    }
}

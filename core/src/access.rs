//! What a job may touch: the storage and NATS locations a spec's sources,
//! sinks and `checkpointing.storage` name must lie under roots the
//! operator allows for the job's namespace (`security.allowedUrls`,
//! `security.namespaces.<ns>.allowedUrls`), and what a job writes must not
//! lie in the job store or in another job's output or checkpoints.
//!
//! Pure logic: callers gather the other jobs' locations and the roots; a
//! refusal names the spec field, the location and the roots that apply.

use std::collections::BTreeMap;
use std::path::Path;

use crate::spec::{JobSpec, SinkSpec, SourceSpec};
use crate::storage::{ParsedUrl, StorageLocation};

/// One allowed root.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Root {
    /// Everything (`*`): no restriction.
    Any,
    /// A storage location and everything under it.
    Store(ParsedUrl),
    /// A NATS server (`nats://host:port`); without a port, any port of
    /// the host.
    Nats { host: String, port: Option<u16> },
}

/// The roots jobs may use, per namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    default: Vec<Root>,
    /// Where a namespace has a list of its own (replacing `default`).
    namespaces: BTreeMap<String, Vec<Root>>,
    /// Shown in refusals: the key the roots come from.
    source: String,
}

/// A location a spec touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touch {
    /// The spec field (`spec.sink.file.path`).
    pub field: &'static str,
    /// The location as written.
    pub url: String,
    /// Whether the job writes there.
    pub writes: bool,
}

/// Parses one root. `*` allows everything; `nats://host:port` a NATS
/// server; anything else is a storage URL or path.
fn parse_root(s: &str) -> Result<Root, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(Root::Any);
    }
    if s.starts_with("nats://") || s.starts_with("tls://") {
        let (host, port) = crate::config::url_host_port(s, 0)
            .ok_or_else(|| format!("{s}: not a NATS server URL (nats://host:port)"))?;
        return Ok(Root::Nats {
            host: host.to_ascii_lowercase(),
            port: (port != 0).then_some(port),
        });
    }
    StorageLocation::parse(s)
        .map(|p| Root::Store(resolve(p)))
        .map_err(|e| e.to_string())
}

/// `host:port` of a NATS URL (scheme optional), host lowercased.
fn nats_host_port(url: &str) -> Option<(String, u16)> {
    crate::config::url_host_port(url, 4222).map(|(h, p)| (h.to_ascii_lowercase(), p))
}

/// A file location with symlinks resolved as far as the path exists, so a
/// link under an allowed root cannot lead outside it.
fn resolve(mut p: ParsedUrl) -> ParsedUrl {
    if p.scheme != "file" {
        return p;
    }
    let path = Path::new(&p.path).to_path_buf();
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut full = real;
            for part in rest.iter().rev() {
                full.push(part);
            }
            p.path = full.to_string_lossy().to_string();
            return p;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return p,
        }
    }
}

/// Whether `inner` is `outer` or lies under it (whole path segments).
fn within(inner: &ParsedUrl, outer: &ParsedUrl) -> bool {
    if inner.scheme != outer.scheme || inner.bucket != outer.bucket {
        return false;
    }
    let (i, o) = (
        inner.path.trim_end_matches('/'),
        outer.path.trim_end_matches('/'),
    );
    o.is_empty() || i == o || i.strip_prefix(o).is_some_and(|r| r.starts_with('/'))
}

fn show(p: &ParsedUrl) -> String {
    match p.scheme.as_str() {
        "file" => format!("file://{}", p.path),
        s => format!("{s}://{}/{}", p.bucket, p.path),
    }
}

impl AccessPolicy {
    /// Anything goes (`ferry local --allow '*'`, tests of other things).
    pub fn unrestricted() -> Self {
        Self {
            default: vec![Root::Any],
            namespaces: BTreeMap::new(),
            source: "no restriction".into(),
        }
    }

    /// Roots from `default` (every namespace without a list of its own)
    /// and `namespaces`; `source` names where they come from, for
    /// refusals (`security.allowedUrls`).
    pub fn new(
        default: &[String],
        namespaces: &BTreeMap<String, Vec<String>>,
        source: &str,
    ) -> Result<Self, String> {
        let parse = |at: &str, list: &[String]| {
            list.iter()
                .map(|s| parse_root(s).map_err(|e| format!("{at}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            default: parse("security.allowedUrls", default)?,
            namespaces: namespaces
                .iter()
                .map(|(ns, list)| {
                    Ok((
                        ns.clone(),
                        parse(&format!("security.namespaces.{ns}.allowedUrls"), list)?,
                    ))
                })
                .collect::<Result<_, String>>()?,
            source: source.to_string(),
        })
    }

    fn roots(&self, namespace: &str) -> (&[Root], String) {
        match self.namespaces.get(namespace) {
            Some(r) => (r, format!("security.namespaces.{namespace}.allowedUrls")),
            None => (&self.default, self.source.clone()),
        }
    }

    /// Checks what `spec` touches against its namespace's roots, and what
    /// it writes (`writes`: its sink and its own checkpoint directory,
    /// resolved by the caller) against `job_store` (nobody's to write
    /// but Ferry's, bar the job's own checkpoints) and `others` (every
    /// other job's output and checkpoint directory). One message per
    /// problem.
    pub fn check(
        &self,
        spec: &JobSpec,
        own_checkpoints: Option<&str>,
        job_store: Option<&str>,
        others: &[(String, String)],
    ) -> Result<(), Vec<(&'static str, String)>> {
        let namespace = spec.metadata.namespace();
        let (roots, from) = self.roots(namespace);
        let mut problems: Vec<(&'static str, String)> = Vec::new();
        let shown_roots = || {
            let list: Vec<String> = roots
                .iter()
                .map(|r| match r {
                    Root::Any => "*".to_string(),
                    Root::Store(p) => show(p),
                    Root::Nats { host, port } => {
                        let host = if host.contains(':') {
                            format!("[{host}]")
                        } else {
                            host.clone()
                        };
                        match port {
                            Some(p) => format!("nats://{host}:{p}"),
                            None => format!("nats://{host}"),
                        }
                    }
                })
                .collect();
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        };
        let any = roots.contains(&Root::Any);
        for t in touches(spec) {
            if t.field.contains("nats") {
                if any {
                    continue;
                }
                for url in t.url.split(',') {
                    let ok = nats_host_port(url.trim()).is_some_and(|(host, port)| {
                        roots.iter().any(|r| {
                            matches!(r, Root::Nats { host: h, port: p } if *h == host && p.is_none_or(|p| p == port))
                        })
                    });
                    if !ok {
                        problems.push((
                            t.field,
                            format!(
                            "the NATS server {} is not one namespace '{namespace}' may use (allowed by {from}: {})",
                            crate::config::redact_url(url.trim()),
                            shown_roots()
                        )));
                    }
                }
                continue;
            }
            let Ok(at) = StorageLocation::parse(&t.url).map(resolve) else {
                continue; // validation reports a bad URL
            };
            if !any
                && !roots
                    .iter()
                    .any(|r| matches!(r, Root::Store(root) if within(&at, root)))
            {
                problems.push((
                    t.field,
                    format!(
                    "{} lies outside the roots namespace '{namespace}' may use (allowed by {from}: {})",
                    show(&at),
                    shown_roots()
                )));
                continue;
            }
            if !t.writes {
                continue;
            }
            // `checkpointing.storage` is a root holding `jobs/<id>/…`: the
            // job writes only its own directory there, checked below.
            let writes = if t.field == "spec.checkpointing.storage" {
                match own_checkpoints.map(StorageLocation::parse) {
                    Some(Ok(p)) => resolve(p),
                    _ => continue,
                }
            } else {
                at
            };
            if t.field != "spec.checkpointing.storage"
                && let Some(Ok(store)) = job_store.map(StorageLocation::parse)
            {
                let jobs = ParsedUrl {
                    path: format!("{}/jobs", store.path.trim_end_matches('/')),
                    ..resolve(store)
                };
                if within(&writes, &jobs) || within(&jobs, &writes) {
                    problems.push((
                        t.field,
                        format!(
                        "{} would write into the job store ({}), which only Ferry writes; choose another directory",
                        show(&writes),
                        show(&jobs)
                    )));
                    continue;
                }
            }
            for (job, location) in others {
                let Ok(other) = StorageLocation::parse(location).map(resolve) else {
                    continue;
                };
                if within(&writes, &other) || within(&other, &writes) {
                    problems.push((
                        t.field,
                        format!(
                        "{} overlaps {} of job {job}; a job never writes into another job's directories",
                        show(&writes),
                        show(&other)
                    )));
                    break;
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Every location `spec` names.
pub fn touches(spec: &JobSpec) -> Vec<Touch> {
    let mut out = Vec::new();
    match &spec.spec.source {
        SourceSpec::File(f) => out.push(Touch {
            field: "spec.source.file.path",
            url: f.path.clone(),
            writes: false,
        }),
        SourceSpec::Nats(n) => out.push(Touch {
            field: "spec.source.nats.url",
            url: n.url.clone(),
            writes: false,
        }),
        SourceSpec::Generator(_) => {}
    }
    match &spec.spec.sink {
        SinkSpec::File(f) => out.push(Touch {
            field: "spec.sink.file.path",
            url: f.path.clone(),
            writes: true,
        }),
        SinkSpec::Nats(n) => out.push(Touch {
            field: "spec.sink.nats.url",
            url: n.url.clone(),
            writes: true,
        }),
        SinkSpec::Stdout(_) | SinkSpec::Blackhole(_) => {}
    }
    if let Some(s) = &spec.spec.checkpointing.storage {
        out.push(Touch {
            field: "spec.checkpointing.storage",
            url: s.clone(),
            writes: true,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, sink: &str, storage: Option<&str>, ns: &str) -> JobSpec {
        let storage = storage
            .map(|s| format!("  checkpointing: {{storage: \"{s}\"}}\n"))
            .unwrap_or_default();
        crate::spec::parse_and_validate(&format!(
            "apiVersion: ferry.dev/v1\nkind: Job\nmetadata: {{name: j, namespace: {ns}}}\nspec:\n{storage}  source:\n{source}\n  sink:\n{sink}\n"
        ))
        .unwrap()
    }

    fn file_source(path: &str) -> String {
        format!("    file: {{path: \"{path}\", format: jsonl, schema: {{a: int}}}}")
    }

    fn file_sink(path: &str) -> String {
        format!("    file: {{path: \"{path}\"}}")
    }

    /// `field: message` of each problem.
    fn text(r: Result<(), Vec<(&'static str, String)>>) -> Result<(), Vec<String>> {
        r.map_err(|e| e.into_iter().map(|(f, m)| format!("{f}: {m}")).collect())
    }

    fn policy(default: &[&str], ns: &[(&str, &[&str])]) -> AccessPolicy {
        AccessPolicy::new(
            &default.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &ns.iter()
                .map(|(n, l)| (n.to_string(), l.iter().map(|s| s.to_string()).collect()))
                .collect(),
            "security.allowedUrls",
        )
        .unwrap()
    }

    #[test]
    fn locations_must_lie_under_the_namespace_roots() {
        let p = policy(
            &["file:///data/shared", "s3://lake/ferry"],
            &[("payments", &["s3://payments/", "nats://nats.payments:4222"])],
        );
        // Inside the default roots.
        let ok = spec(
            &file_source("/data/shared/in/*.jsonl"),
            &file_sink("s3://lake/ferry/out"),
            None,
            "default",
        );
        assert_eq!(text(p.check(&ok, None, None, &[])), Ok(()));
        // `..` and a sibling whose name extends the root's are outside.
        for path in ["/data/shared/../../etc/passwd", "/data/shared-other/x"] {
            let s = spec(
                &file_source(path),
                &file_sink("s3://lake/ferry/o"),
                None,
                "default",
            );
            let e = text(p.check(&s, None, None, &[])).unwrap_err();
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with("spec.source.file.path: file:///") && e[0].contains("outside the roots namespace 'default' may use (allowed by security.allowedUrls: file:///data/shared, s3://lake/ferry)"),
                "{e:?}"
            );
        }
        // A namespace with its own list does not get the default's.
        let s = spec(
            &file_source("/data/shared/in"),
            &file_sink("s3://payments/out"),
            Some("s3://lake/ferry/cp"),
            "payments",
        );
        let e = text(p.check(&s, None, None, &[])).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("spec.source.file.path")
                && e[0].contains("security.namespaces.payments.allowedUrls: s3://payments/"),
            "{e:?}"
        );
        assert!(e[1].starts_with("spec.checkpointing.storage"), "{e:?}");
        // NATS servers by host and port; credentials never shown.
        let nats = |url: &str| {
            spec(
                &format!("    nats: {{url: \"{url}\", stream: S, schema: {{a: int}}}}"),
                &file_sink("s3://payments/o"),
                None,
                "payments",
            )
        };
        assert_eq!(
            text(p.check(&nats("nats://u:pw@NATS.payments:4222"), None, None, &[])),
            Ok(())
        );
        let e = text(p.check(&nats("nats://nats.payments:4223"), None, None, &[])).unwrap_err();
        assert!(
            e[0].contains("nats://nats.payments:4223 is not one"),
            "{e:?}"
        );
        // A root without a port allows every port of its host.
        let local = policy(&[], &[("payments", &["nats://127.0.0.1", "s3://payments"])]);
        assert_eq!(
            text(local.check(&nats("nats://127.0.0.1:61234"), None, None, &[])),
            Ok(())
        );
        let e = text(p.check(
            &nats("nats://nats.payments:4222,nats://u:secretpw@evil:4222"),
            None,
            None,
            &[],
        ))
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "spec.source.nats.url: the NATS server nats://u:***@evil:4222 is not one"
            ),
            "{e:?}"
        );
        assert!(!e[0].contains("secretpw"));
        // `*` allows anything.
        let any = policy(&["*"], &[]);
        let s = spec(
            &file_source("/etc/passwd"),
            &file_sink("/etc/x"),
            None,
            "default",
        );
        assert_eq!(text(any.check(&s, None, None, &[])), Ok(()));
        // No roots at all: nothing is allowed, and the message says so.
        let none = policy(&[], &[]);
        let e = text(none.check(&s, None, None, &[])).unwrap_err();
        assert!(e[0].ends_with("security.allowedUrls: none)"), "{e:?}");
        // Roots are checked when read.
        let e = AccessPolicy::new(&["nats://".into()], &BTreeMap::new(), "x").unwrap_err();
        assert!(e.starts_with("security.allowedUrls: nats://"), "{e}");
    }

    #[test]
    fn a_job_never_writes_into_the_job_store_or_another_jobs_directories() {
        let p = policy(&["/r"], &[]);
        let others = vec![
            ("job-a".to_string(), "/r/out-a".to_string()),
            (
                "job-a".to_string(),
                "file:///r/cp/jobs/a/checkpoints".to_string(),
            ),
        ];
        let check = |sink: &str, storage: Option<&str>, own: Option<&str>| {
            let s = spec(
                &file_source("/r/out-a"),
                &file_sink(sink),
                storage,
                "default",
            );
            text(p.check(&s, own, Some("file:///r/store"), &others))
        };
        // Reading another job's output is fine; writing beside it too.
        assert_eq!(check("/r/out-b", None, None), Ok(()));
        for (sink, want) in [
            ("/r/out-a/x", "overlaps file:///r/out-a of job job-a"),
            ("/r", "would write into the job store"),
            (
                "/r/cp",
                "overlaps file:///r/cp/jobs/a/checkpoints of job job-a",
            ),
            ("/r/cp/jobs/a/checkpoints/9", "overlaps"),
            (
                "/r/store/jobs/b",
                "would write into the job store (file:///r/store/jobs)",
            ),
        ] {
            let e = check(sink, None, None).unwrap_err();
            assert!(
                e[0].starts_with("spec.sink.file.path") && e[0].contains(want),
                "{sink}: {e:?}"
            );
        }
        // Its own checkpoints beside another job's, in a shared root: fine;
        // a checkpoint root inside another job's output: refused.
        assert_eq!(
            check(
                "/r/out-b",
                Some("/r/cp"),
                Some("file:///r/cp/jobs/b/checkpoints")
            ),
            Ok(())
        );
        let e = check(
            "/r/out-b",
            Some("/r/out-a"),
            Some("file:///r/out-a/jobs/b/checkpoints"),
        )
        .unwrap_err();
        assert!(
            e[0].starts_with("spec.checkpointing.storage") && e[0].contains("job-a"),
            "{e:?}"
        );
    }

    #[test]
    fn a_symlink_under_a_root_does_not_lead_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let p = policy(&[&root.display().to_string()], &[]);
        let s = spec(
            &file_source(&root.join("in").display().to_string()),
            &file_sink(&root.join("link/out").display().to_string()),
            None,
            "default",
        );
        let e = text(p.check(&s, None, None, &[])).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("spec.sink.file.path"), "{e:?}");
    }
}

//! Settings of the NATS JetStream source and sink, their validation, and
//! the subject rules that validation and the runtime share: server URLs,
//! stream names, subject filters (and whether two of them overlap), and
//! sink subject templates.
//!
//! Invariant: a template or filter that passed these checks renders or
//! matches only valid NATS subjects, so the runtime never publishes to a
//! wildcard and never reads one message through two partitions.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::Schema;
use crate::spec::DurationSpec;
use crate::value::DataType;

/// Records from a NATS JetStream stream, one JSON object per message.
///
/// Each entry of `subjects` is a partition read by its own ordered consumer;
/// its offset is the next stream sequence to read, so a restore re-reads
/// exactly what followed the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSourceSpec {
    /// NATS server URL, e.g. `nats://127.0.0.1:4222`; several servers of one
    /// cluster separated by commas.
    pub url: String,
    /// Name of the JetStream stream to read.
    pub stream: String,
    /// Subject filters, one partition each (default: the whole stream as one
    /// partition). Subtask `j` reads the filters whose index `% parallelism
    /// == j`; filters must not overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Message payload format (default `json`: one JSON object per message).
    #[serde(default)]
    pub format: NatsFormat,
    /// Field names and types, in output order.
    pub schema: IndexMap<String, DataType>,
    /// Which field holds event time (default: the time the server stored the
    /// message), and how out of order it may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<NatsEventTime>,
    /// Where a job without a checkpoint starts reading (default `earliest`).
    #[serde(default)]
    pub start_from: StartFrom,
    /// Read up to the stream's last message at job start, then end (default
    /// false: read new messages forever).
    #[serde(default)]
    pub stop_at_end: bool,
    /// A message that is not a JSON object, has a field of another type
    /// than the schema's, or lacks its event time: `fail` (default) fails
    /// the job naming the stream and sequence; `skip` logs and counts it.
    #[serde(default)]
    pub on_bad_line: crate::spec::BadLinePolicy,
    /// A partition that receives no message for this long stops holding
    /// the watermark back until its next message (default: off, every
    /// partition holds it back). Its later records may then be late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<crate::spec::DurationSpec>,
}

/// Payload formats the NATS source reads.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NatsFormat {
    /// One JSON object per message.
    #[default]
    Json,
}

/// Event time of NATS records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsEventTime {
    /// A `timestamp` (RFC 3339 or epoch ms) or `int` (epoch ms) field of the
    /// schema; absent: the time the server stored the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Bound on disorder within a partition; also the watermark delay (default 0s).
    #[serde(default)]
    pub max_out_of_orderness: DurationSpec,
}

/// Where a NATS source starts when there is no checkpoint to resume.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum StartFrom {
    /// The stream's first message.
    #[default]
    Earliest,
    /// Only messages stored after the job started.
    Latest,
    /// This stream sequence (1 is the first message ever stored).
    Sequence(u64),
}

/// Records published to a NATS JetStream stream as JSON, exactly once
/// within the stream's duplicate window.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSinkSpec {
    /// NATS server URL, e.g. `nats://127.0.0.1:4222`; several servers of one
    /// cluster separated by commas.
    pub url: String,
    /// Subject of every record: fixed (`clicks.per-minute`) or a template
    /// whose `{field}` parts are replaced by the record's values
    /// (`clicks.{country}`).
    pub subject: String,
    /// The stream that stores `subject`. The sink checks that it exists, that
    /// its duplicate window is long enough for a replay to be deduplicated,
    /// and that every publish lands in it.
    pub stream: String,
}

/// Checks the NATS-specific settings of a source at `path` (the schema and
/// event-time field are checked like every source's).
pub(crate) fn check_source(n: &NatsSourceSpec, path: &str, push: &mut impl FnMut(&str, String)) {
    check_endpoint(&n.url, &n.stream, path, push);
    for (i, filter) in n.subjects.iter().enumerate() {
        if let Err(e) = check_subject_filter(filter) {
            push(&format!("{path}.subjects[{i}]"), e);
            continue;
        }
        let earlier = n.subjects[..i]
            .iter()
            .enumerate()
            .find(|(_, f)| check_subject_filter(f).is_ok() && filters_overlap(f, filter));
        if let Some((j, other)) = earlier {
            push(
                &format!("{path}.subjects[{i}]"),
                format!(
                    "'{filter}' overlaps '{other}' (subjects[{j}]): a message would be read twice; make the filters disjoint"
                ),
            );
        }
    }
    match n.start_from {
        StartFrom::Sequence(0) => push(
            &format!("{path}.startFrom.sequence"),
            "must be at least 1 (the first message of a stream has sequence 1)".into(),
        ),
        StartFrom::Latest if n.stop_at_end => push(
            &format!("{path}.stopAtEnd"),
            "with 'startFrom: latest' there is nothing to read before the end; drop one of them"
                .into(),
        ),
        _ => {}
    }
}

/// Checks a sink at `path` whose input records have `schema`.
pub(crate) fn check_sink(
    n: &NatsSinkSpec,
    schema: &Schema,
    path: &str,
    push: &mut impl FnMut(&str, String),
) {
    check_endpoint(&n.url, &n.stream, path, push);
    match SubjectTemplate::parse(&n.subject) {
        Ok(t) => {
            for f in t.fields().filter(|f| schema.index_of(f).is_none()) {
                push(
                    &format!("{path}.subject"),
                    format!(
                        "unknown field '{f}' in '{{{f}}}' (fields here: {})",
                        schema.names().join(", ")
                    ),
                );
            }
        }
        Err(e) => push(&format!("{path}.subject"), e),
    }
}

/// The server URLs and stream name of a source or sink.
fn check_endpoint(url: &str, stream: &str, path: &str, push: &mut impl FnMut(&str, String)) {
    if let Err(e) = server_urls(url) {
        push(&format!("{path}.url"), e);
    }
    if let Err(e) = check_stream_name(stream) {
        push(&format!("{path}.stream"), e);
    }
}

/// Splits a comma-separated server list, checking each URL.
pub fn server_urls(url: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in url.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!(
                "'{}' has an empty server; write e.g. nats://127.0.0.1:4222",
                crate::config::redact_url(url)
            ));
        }
        let full = if part.contains("://") {
            part.to_string()
        } else {
            format!("nats://{part}")
        };
        let parsed = url::Url::parse(&full)
            .map_err(|e| format!("'{}' is not a URL: {e}", crate::config::redact_url(part)))?;
        if !matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(format!(
                "'{}' has scheme '{}'; use nats://, tls://, ws:// or wss://",
                crate::config::redact_url(part),
                parsed.scheme()
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!(
                "'{}' names no host",
                crate::config::redact_url(part)
            ));
        }
        out.push(full);
    }
    Ok(out)
}

/// Checks a JetStream stream name (no spaces, `.`, `*`, `>`, `/` or `\`).
pub fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(*c))
    {
        return Err(format!(
            "'{name}' is not a valid stream name: it contains {c:?} (stream names have no spaces, '.', '*', '>', '/' or '\\')"
        ));
    }
    Ok(())
}

/// Checks a subject filter: non-empty tokens, `*` only as a whole token,
/// `>` only as the whole last token.
pub fn check_subject_filter(filter: &str) -> Result<(), String> {
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(format!(
                "'{filter}' has an empty token (two dots, or a dot at an end)"
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("'{filter}' contains white space"));
        }
        if (t.contains('*') && *t != "*") || (t.contains('>') && *t != ">") {
            return Err(format!(
                "'{filter}': wildcards '*' and '>' must be whole tokens, e.g. orders.*.eu"
            ));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(format!("'{filter}': '>' may only be the last token"));
        }
    }
    Ok(())
}

/// Whether some subject matches both (valid) filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == y || *x == "*" || *y == "*" => i += 1,
            _ => return false,
        }
    }
}

/// One part of a subject template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectPart {
    Literal(String),
    /// Replaced by the record's value of this field.
    Field(String),
}

/// A sink subject with `{field}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectTemplate {
    pub parts: Vec<SubjectPart>,
}

impl SubjectTemplate {
    /// Parses and checks a template: placeholders are `{name}`, and with each
    /// placeholder standing for one token character the subject must be a
    /// valid publish subject (no wildcards, no empty tokens, no spaces).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("'{text}' has a '}}' without '{{'"));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("'{text}' has a '{{' without '}}'"));
            };
            if open > 0 {
                parts.push(SubjectPart::Literal(rest[..open].to_string()));
            }
            let name = rest[open + 1..open + close].trim();
            if name.is_empty() {
                return Err(format!(
                    "'{text}' has an empty placeholder '{{}}'; name a field"
                ));
            }
            parts.push(SubjectPart::Field(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(SubjectPart::Literal(rest.to_string()));
        }
        let probe: String = parts
            .iter()
            .map(|p| match p {
                SubjectPart::Literal(s) => s.as_str(),
                SubjectPart::Field(_) => "x",
            })
            .collect();
        if probe.is_empty() {
            return Err("must not be empty".into());
        }
        check_subject_filter(&probe)
            .map_err(|e| format!("'{text}' is not a valid subject ({e})"))?;
        if probe.split('.').any(|t| t == "*" || t == ">") {
            return Err(format!(
                "'{text}' contains a wildcard; a record is published to one subject"
            ));
        }
        Ok(Self { parts })
    }

    /// The field names the template uses.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            SubjectPart::Field(f) => Some(f.as_str()),
            SubjectPart::Literal(_) => None,
        })
    }
}

/// Makes a value safe as (part of) one subject token: characters other than
/// ASCII letters, digits, `-` and `_` become `_`; an empty value becomes `_`.
pub fn subject_token(value: &str) -> String {
    if value.is_empty() {
        return "_".to_string();
    }
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in ["a", "a.b", "a.*.c", "a.>", ">", "*"] {
            assert_eq!(check_subject_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.b*", "a.>.c", "a b", "a.>x"] {
            assert!(check_subject_filter(bad).is_err(), "{bad}");
        }
        assert!(filters_overlap("a.b", "a.b"));
        assert!(filters_overlap("a.*", "a.b"));
        assert!(filters_overlap("a.>", "a.b.c"));
        assert!(filters_overlap(">", "x"));
        assert!(!filters_overlap("a.b", "a.c"));
        assert!(!filters_overlap("a.*", "a.b.c"));
        assert!(!filters_overlap("a.b", "a.b.c"));
        assert!(!filters_overlap("a.>", "a"));
    }

    #[test]
    fn templates() {
        let t = SubjectTemplate::parse("out.{user}.x{n}").unwrap();
        assert_eq!(
            t.parts,
            vec![
                SubjectPart::Literal("out.".into()),
                SubjectPart::Field("user".into()),
                SubjectPart::Literal(".x".into()),
                SubjectPart::Field("n".into()),
            ]
        );
        assert_eq!(t.fields().collect::<Vec<_>>(), ["user", "n"]);
        assert!(SubjectTemplate::parse("out.fixed").is_ok());
        for bad in [
            "out.{user",
            "out.user}",
            "out.{}",
            "out.*",
            "out.>",
            "out..x",
            "",
        ] {
            assert!(SubjectTemplate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(subject_token("a.b c>"), "a_b_c_");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn servers() {
        assert_eq!(
            server_urls("nats://127.0.0.1:4222, 127.0.0.1:4223").unwrap(),
            ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
        );
        assert!(server_urls("http://x:1").is_err());
        assert!(server_urls("nats://a:1,").is_err());
        assert!(check_stream_name("ORDERS").is_ok());
        assert!(check_stream_name("a.b").is_err());
    }
}

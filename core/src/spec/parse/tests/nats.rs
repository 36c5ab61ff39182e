//! The NATS source and sink settings: a complete spec parses into the
//! expected values, and every mistake is reported at its field path and line.

use super::{only, parse_and_validate};
use crate::spec::{SinkSpec, SourceSpec, StartFrom};

const VALID: &str = r#"apiVersion: ferry.dev/v1
kind: Job
metadata: {name: nats-counts}
spec:
  parallelism: 2
  source:
    nats:
      url: nats://127.0.0.1:4222
      stream: CLICKS
      subjects: [clicks.eu, clicks.us]
      schema: {user: string, ts: timestamp}
      eventTime: {field: ts, maxOutOfOrderness: 2s}
      startFrom: {sequence: 5}
      stopAtEnd: true
  operators:
    - key_by: user
    - window: {tumbling: 1m, aggregate: {clicks: count}}
  sink:
    nats:
      url: nats://127.0.0.1:4222
      subject: counts.{user}
      stream: COUNTS
"#;

fn with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "test bug: {from:?} is not in VALID");
    VALID.replacen(from, to, 1)
}

#[test]
fn valid_nats_spec_parses() {
    let spec = parse_and_validate(VALID).unwrap();
    let SourceSpec::Nats(s) = &spec.spec.source else {
        panic!("nats source expected")
    };
    assert_eq!(s.stream, "CLICKS");
    assert_eq!(s.subjects, ["clicks.eu", "clicks.us"]);
    assert_eq!(s.start_from, StartFrom::Sequence(5));
    assert!(s.stop_at_end);
    assert_eq!(s.event_time.as_ref().unwrap().field.as_deref(), Some("ts"));
    let SinkSpec::Nats(k) = &spec.spec.sink else {
        panic!("nats sink expected")
    };
    assert_eq!(k.subject, "counts.{user}");
    // Defaults: the whole stream, publish time, from the start, unbounded.
    let minimal = with(
        "      subjects: [clicks.eu, clicks.us]\n      schema: {user: string, ts: timestamp}\n      eventTime: {field: ts, maxOutOfOrderness: 2s}\n      startFrom: {sequence: 5}\n      stopAtEnd: true\n",
        "      schema: {user: string}\n      startFrom: earliest\n",
    );
    let spec = parse_and_validate(&minimal).unwrap();
    let SourceSpec::Nats(s) = &spec.spec.source else {
        panic!()
    };
    assert!(s.subjects.is_empty() && s.event_time.is_none() && !s.stop_at_end);
    assert_eq!(s.start_from, StartFrom::Earliest);
    // The JSON Schema (`ferry schema`) describes both.
    let schema = crate::spec::JobSpec::json_schema();
    for def in [
        "NatsSourceSpec",
        "NatsSinkSpec",
        "StartFrom",
        "NatsEventTime",
    ] {
        assert!(
            schema["$defs"][def]["description"].is_string(),
            "{def} missing"
        );
    }
    let props = &schema["$defs"]["NatsSourceSpec"]["properties"];
    for key in [
        "url",
        "stream",
        "subjects",
        "schema",
        "eventTime",
        "startFrom",
        "stopAtEnd",
    ] {
        assert!(props[key].is_object(), "{key} missing from the schema");
    }
}

#[test]
fn source_mistakes_are_located() {
    let m = only(
        &with(
            "url: nats://127.0.0.1:4222\n      stream",
            "url: http://127.0.0.1:4222\n      stream",
        ),
        "spec.source.nats.url",
        8,
    );
    assert!(m.contains("nats://"), "{m}");
    let m = only(
        &with("stream: CLICKS", "stream: clicks.all"),
        "spec.source.nats.stream",
        9,
    );
    assert!(m.contains("'.'"), "{m}");
    let m = only(
        &with("[clicks.eu, clicks.us]", "[clicks.eu, clicks.*]"),
        "spec.source.nats.subjects[1]",
        10,
    );
    assert!(m.contains("overlaps 'clicks.eu'"), "{m}");
    let m = only(
        &with("[clicks.eu, clicks.us]", "[clicks.eu, clicks..us]"),
        "spec.source.nats.subjects[1]",
        10,
    );
    assert!(m.contains("empty token"), "{m}");
    let m = only(
        &with(
            "{field: ts, maxOutOfOrderness",
            "{field: user, maxOutOfOrderness",
        ),
        "spec.source.nats.eventTime.field",
        12,
    );
    assert!(m.contains("must be a timestamp"), "{m}");
    let m = only(
        &with("{sequence: 5}", "{sequence: 0}"),
        "spec.source.nats.startFrom.sequence",
        13,
    );
    assert!(m.contains("at least 1"), "{m}");
    let m = only(
        &with("{sequence: 5}", "latest"),
        "spec.source.nats.stopAtEnd",
        14,
    );
    assert!(m.contains("nothing to read"), "{m}");
    let m = only(
        &with("{sequence: 5}", "newest"),
        "spec.source.nats.startFrom",
        13,
    );
    assert!(m.contains("earliest"), "{m}");
}

#[test]
fn unknown_and_missing_source_fields_are_located() {
    let m = only(
        &with("stopAtEnd: true", "stopAtEnd: true\n      batch: 10"),
        "spec.source.nats.batch",
        15,
    );
    assert!(m.contains("unknown field"), "{m}");
    let m = only(
        &with("      stream: CLICKS\n", ""),
        "spec.source.nats.stream",
        7,
    );
    assert!(m.contains("missing"), "{m}");
    let m = only(
        &with("stopAtEnd: true", "format: csv"),
        "spec.source.nats.format",
        14,
    );
    assert!(m.contains("json"), "{m}");
}

#[test]
fn sink_mistakes_are_located() {
    let m = only(
        &with("subject: counts.{user}", "subject: counts.{country}"),
        "spec.sink.nats.subject",
        21,
    );
    assert!(
        m.contains("unknown field 'country'") && m.contains("clicks"),
        "{m}"
    );
    let m = only(
        &with("subject: counts.{user}", "subject: counts.>"),
        "spec.sink.nats.subject",
        21,
    );
    assert!(m.contains("wildcard"), "{m}");
    let m = only(
        &with("subject: counts.{user}", "subject: counts.{user"),
        "spec.sink.nats.subject",
        21,
    );
    assert!(m.contains("without '}'"), "{m}");
    let m = only(
        &with("stream: COUNTS", "stream: \"\""),
        "spec.sink.nats.stream",
        22,
    );
    assert!(m.contains("empty"), "{m}");
    let m = only(
        &with(
            "      url: nats://127.0.0.1:4222\n      subject",
            "      url: \"nats://a:1,\"\n      subject",
        ),
        "spec.sink.nats.url",
        20,
    );
    assert!(m.contains("empty server"), "{m}");
}

/// The job store keeps specs as `to_yaml` writes them; NATS settings
/// (including `startFrom` in both forms) read back unchanged.
#[test]
fn nats_specs_written_by_to_yaml_read_back() {
    for text in [
        VALID.to_string(),
        with("{sequence: 5}", "earliest").replace("stopAtEnd: true", "stopAtEnd: false"),
    ] {
        let spec = parse_and_validate(&text).unwrap();
        let yaml = spec.to_yaml();
        assert_eq!(parse_and_validate(&yaml).unwrap(), spec, "{yaml}");
    }
}

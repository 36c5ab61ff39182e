//! Every problem is reported once, at the right field path and line, and no
//! input makes parsing panic.

use super::*;

mod nats;

const VALID: &str = r#"apiVersion: ferry.dev/v1
kind: Job
metadata:
  name: clicks-per-minute
spec:
  parallelism: 2
  checkpointing:
    interval: 1s
    retained: 3
  source:
    generator:
      total: 100000
      eventTime:
        step: 5ms
        maxOutOfOrderness: 2s
      fields:
        user: {type: key, cardinality: 100, prefix: "user-"}
        amount: {type: float, min: 0, max: 100}
  operators:
    - filter: "amount > 10.0"
    - key_by: user
    - window:
        tumbling: 1m
        aggregate:
          clicks: count
          total: sum(amount)
  sink:
    file:
      path: ./out/clicks-per-minute
"#;

/// `VALID` with `from` replaced by `to` (which must occur).
fn with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "test bug: {from:?} is not in VALID");
    VALID.replacen(from, to, 1)
}

fn problems(text: &str) -> Vec<SpecError> {
    match parse_and_validate(text) {
        Ok(_) => panic!("expected problems in:\n{text}"),
        Err(e) => e.0,
    }
}

/// (path, line) of every problem.
fn located(text: &str) -> Vec<(String, usize)> {
    problems(text)
        .into_iter()
        .map(|e| (e.path, e.line.expect("every problem has a line")))
        .collect()
}

/// Asserts exactly one problem, at `path` and `line`, and returns its message.
fn only(text: &str, path: &str, line: usize) -> String {
    let ps = problems(text);
    assert_eq!(
        ps.iter()
            .map(|e| (e.path.as_str(), e.line))
            .collect::<Vec<_>>(),
        vec![(path, Some(line))],
        "{ps:#?}"
    );
    ps[0].message.clone()
}

#[test]
fn valid_spec_passes_and_keeps_field_order() {
    let spec = parse_and_validate(VALID).unwrap();
    assert_eq!(spec.metadata.name, "clicks-per-minute");
    assert_eq!(spec.spec.operators.len(), 3);
    let crate::spec::SourceSpec::Generator(g) = &spec.spec.source else {
        panic!("generator expected");
    };
    assert_eq!(g.fields.keys().collect::<Vec<_>>(), ["user", "amount"]);
}

#[test]
fn yaml_syntax_error() {
    let m = only(
        &with("- key_by: user", "- key_by: user: x"),
        "spec.operators[1]",
        21,
    );
    assert!(m.starts_with("invalid YAML"), "{m}");
}

#[test]
fn wrong_type() {
    let m = only(
        &with("parallelism: 2", "parallelism: two"),
        "spec.parallelism",
        6,
    );
    assert!(m.contains("whole number") && m.contains("'two'"), "{m}");
    // The field's own rule, as validation states it, not u32's range.
    assert_eq!(
        m,
        "expected a whole number from 1 to 1024, found the text 'two'"
    );
    for bad in ["-1", "2.5", "99999999999"] {
        let m = only(
            &with("parallelism: 2", &format!("parallelism: {bad}")),
            "spec.parallelism",
            6,
        );
        assert!(
            m.starts_with("expected a whole number from 1 to 1024, found the number"),
            "{bad}: {m}"
        );
    }
}

#[test]
fn unknown_field_suggests_the_right_one() {
    let text = with("    retained: 3\n", "    retained: 3\n    retain: 4\n");
    let m = only(&text, "spec.checkpointing.retain", 10);
    assert!(m.contains("did you mean 'retained'"), "{m}");
}

#[test]
fn unknown_source_kind() {
    let text = with("    generator:\n", "    kafka:\n");
    let m = only(&text, "spec.source.kafka", 11);
    assert!(m.contains("generator, file"), "{m}");
}

#[test]
fn missing_sink_points_at_its_parent() {
    let text = &VALID[..VALID.find("  sink:").unwrap()];
    let m = only(text, "spec.sink", 5);
    assert!(m.contains("sink: {stdout: {}}"), "{m}");
}

#[test]
fn bad_duration() {
    let m = only(
        &with("interval: 1s", "interval: fast"),
        "spec.checkpointing.interval",
        8,
    );
    assert!(m.contains("500ms"), "{m}");
}

#[test]
fn window_without_key_by() {
    let m = only(
        &with("    - key_by: user\n", ""),
        "spec.operators[1].window",
        21,
    );
    assert!(m.contains("key_by"), "{m}");
}

#[test]
fn unknown_field_in_key_by() {
    let m = only(
        &with("key_by: user", "key_by: usr"),
        "spec.operators[1].key_by",
        21,
    );
    assert!(m.contains("'usr'"), "{m}");
}

#[test]
fn cel_syntax_error_in_filter() {
    only(
        &with("amount > 10.0", "amount > > 10.0"),
        "spec.operators[0].filter",
        20,
    );
}

#[test]
fn sum_of_a_string_field() {
    let text = with("sum(amount)", "sum(user)");
    let m = only(&text, "spec.operators[2].window.aggregate.total", 26);
    assert!(m.contains("needs a number"), "{m}");
}

#[test]
fn sliding_size_not_a_multiple_of_slide() {
    let text = with("tumbling: 1m", "sliding: {size: 1m, slide: 7s}");
    only(&text, "spec.operators[2].window.sliding.size", 23);
}

#[test]
fn invalid_metadata_name() {
    only(
        &with("name: clicks-per-minute", "name: Clicks_Per_Minute"),
        "metadata.name",
        4,
    );
}

#[test]
fn several_structural_errors_are_all_reported() {
    let text = with("parallelism: 2", "parallelism: -1")
        .replacen("    retained: 3\n", "    retained: 3\n    foo: 1\n", 1)
        .replacen("- key_by: user", "- keyBy: user", 1)
        .replacen("      path: ./out", "      pth: ./out", 1);
    assert_eq!(
        located(&text),
        [
            ("spec.parallelism".to_string(), 6),
            ("spec.checkpointing.foo".to_string(), 10),
            ("spec.operators[1].keyBy".to_string(), 22),
            ("spec.sink.file.path".to_string(), 29),
            ("spec.sink.file.pth".to_string(), 30),
        ]
    );
}

#[test]
fn structural_and_semantic_errors_together() {
    // An unknown key is dropped without side effects, so the semantic
    // problems of the rest are still reported.
    let text = with("    retained: 3\n", "    retained: 3\n    foo: 1\n")
        .replacen("name: clicks-per-minute", "name: Bad_Name", 1)
        .replacen("sum(amount)", "sum(nope)", 1);
    assert_eq!(
        located(&text),
        [
            ("metadata.name".to_string(), 4),
            ("spec.checkpointing.foo".to_string(), 10),
            ("spec.operators[2].window.aggregate.total".to_string(), 27),
        ]
    );
}

#[test]
fn errors_in_several_operators() {
    let text = with(
        "    - filter: \"amount > 10.0\"\n",
        "    - filter: \"amount > 10.0\"\n      map: {a: b}\n    - frobnicate: 1\n",
    );
    assert_eq!(
        located(&text),
        [
            ("spec.operators[0]".to_string(), 20),
            ("spec.operators[1].frobnicate".to_string(), 22),
        ]
    );
}

#[test]
fn repairs_do_not_cause_follow_up_problems() {
    // The broken `user` field must not make `key_by: user` look unknown.
    let text = with("cardinality: 100", "cardinalty: 100");
    assert_eq!(
        located(&text),
        [
            (
                "spec.source.generator.fields.user.cardinality".to_string(),
                17
            ),
            (
                "spec.source.generator.fields.user.cardinalty".to_string(),
                17
            ),
        ]
    );
}

#[test]
fn tagged_mapping_errors_point_at_the_entry() {
    let text = with(
        "  checkpointing:\n",
        "  restartStrategy:\n    type: fixed-attempts\n    attempts: many\n  checkpointing:\n",
    );
    only(&text, "spec.restartStrategy.attempts", 9);
    let text = with(
        "  checkpointing:\n",
        "  restartStrategy: {attempts: 3}\n  checkpointing:\n",
    );
    let m = only(&text, "spec.restartStrategy.type", 7);
    assert!(m.contains("fixed-attempts"), "{m}");
    let text = with("{type: float, min", "{type: double, min");
    only(&text, "spec.source.generator.fields.amount.type", 18);
}

#[test]
fn empty_values_of_required_sections() {
    assert_eq!(
        located("apiVersion:\nkind:\nmetadata:\nspec:\n"),
        [
            ("apiVersion".to_string(), 1),
            ("kind".to_string(), 2),
            ("metadata.name".to_string(), 3),
            ("spec.sink".to_string(), 4),
            ("spec.source".to_string(), 4),
        ]
    );
}

#[test]
fn json_with_an_error() {
    let text = r#"{
  "apiVersion": "ferry.dev/v1",
  "kind": "Job",
  "metadata": {"name": "j"},
  "spec": {
    "source": {"generator": {"fields": {"a": {"type": "sequence"}}}},
    "operators": [{"filter": "a > 1"}, {"filter": "b > 1"}],
    "sink": {"stdout": {}}
  }
}"#;
    only(text, "spec.operators[1].filter", 7);
    let valid = text.replace("b > 1", "a > 2");
    assert_eq!(parse_and_validate(&valid).unwrap().spec.operators.len(), 2);
}

#[test]
fn json_syntax_error() {
    let text =
        "{\n  \"apiVersion\": \"ferry.dev/v1\",\n  \"kind\": \"Job\"\n  \"metadata\": {}\n}\n";
    let m = only(text, "", 4);
    assert!(m.starts_with("invalid JSON"), "{m}");
}

#[test]
fn document_level_problems() {
    let cases: &[(&str, usize)] = &[
        ("", 1),
        ("# only a comment\n", 1),
        ("- a\n- b\n", 1),
        ("just text", 1),
        ("\u{0}\u{1}\u{2}garbage", 1),
        ("a: [1, 2\n", 2),
        ("a: 'open\n", 1),
    ];
    for (text, line) in cases {
        let ps = problems(text);
        assert_eq!(ps.len(), 1, "{text:?}: {ps:?}");
        assert_eq!(ps[0].line, Some(*line), "{text:?}: {ps:?}");
    }
    let m = only(&format!("{VALID}---\na: 1\n"), "", 30);
    assert!(m.contains("second YAML document"), "{m}");
}

#[test]
fn tabs_duplicates_and_huge_numbers() {
    let m = only(
        &with("    retained: 3\n", "\tretained: 3\n"),
        "spec.checkpointing.interval",
        9,
    );
    assert!(m.contains("tab"), "{m}");
    let m = only(
        &with("    retained: 3\n", "    retained: 3\n    retained: 4\n"),
        "spec.checkpointing.retained",
        10,
    );
    assert!(m.contains("line 9"), "{m}");
    let m = only(
        &with("total: 100000", "total: 100000000000000000000000000"),
        "spec.source.generator.total",
        12,
    );
    assert!(m.contains("64 bits"), "{m}");
    only(
        &with("parallelism: 2", "parallelism: 99999999999"),
        "spec.parallelism",
        6,
    );
}

#[test]
fn limits_stop_deep_nesting_and_alias_bombs() {
    let deep = format!("a: {}{}\n", "[".repeat(200), "]".repeat(200));
    assert!(problems(&deep)[0].message.contains("levels deep"));
    // The YAML scanner has its own, higher limit.
    let deeper = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert!(problems(&deeper)[0].message.contains("recursion limit"));
    let deep_block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    assert!(problems(&deep_block)[0].message.contains("levels deep"));
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g"]
        .iter()
        .zip(["b", "c", "d", "e", "f", "g", "h"])
    {
        bomb.push_str(&format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 10].join(", ")
        ));
    }
    assert!(problems(&bomb)[0].message.contains("expands to more than"));
}

#[test]
fn the_number_of_problems_is_bounded() {
    let junk: String = (0..300).map(|i| format!("    junk{i}: 1\n")).collect();
    let ps = problems(&with(
        "    retained: 3\n",
        &format!("    retained: 3\n{junk}"),
    ));
    assert_eq!(ps.len(), MAX_ROUNDS + 1);
    assert!(ps[0].message.starts_with("stopped after"), "{:?}", ps[0]);
}

#[test]
fn no_prefix_or_mutation_of_a_spec_panics() {
    for (i, _) in VALID.char_indices() {
        let _ = parse_and_validate(&VALID[..i]);
    }
    // Deterministic pseudo-random single-byte mutations (xorshift).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let alphabet = b" \t\n:-[]{}&*!|>'\"#%@`,?0a";
    for _ in 0..2_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut bytes = VALID.as_bytes().to_vec();
        let at = (x as usize) % bytes.len();
        bytes[at] = alphabet[(x >> 32) as usize % alphabet.len()];
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = parse_and_validate(text);
        }
    }
}

#[test]
fn yaml_written_by_to_yaml_reads_back() {
    let spec = parse_and_validate(VALID).unwrap();
    let yaml = spec.to_yaml();
    assert_eq!(parse_spec(&yaml).unwrap(), spec, "{yaml}");
}

#[test]
fn short_forms_are_accepted() {
    let text = with(
        "    file:\n      path: ./out/clicks-per-minute\n",
        "    stdout\n",
    );
    assert!(matches!(
        parse_and_validate(&text).unwrap().spec.sink,
        crate::spec::SinkSpec::Stdout(_)
    ));
    let text = with(
        "  checkpointing:\n    interval: 1s\n    retained: 3\n",
        "  checkpointing:\n",
    );
    assert_eq!(
        parse_and_validate(&text)
            .unwrap()
            .spec
            .checkpointing
            .retained,
        3
    );
}

#[test]
fn parse_spec_skips_semantic_checks() {
    assert!(parse_spec(&with("    - key_by: user\n", "")).is_ok());
    assert!(parse_spec(&with("parallelism: 2", "parallelism: x")).is_err());
}

#[test]
fn format_detection_and_display() {
    assert_eq!(SpecFormat::detect("  {\"a\": 1}"), SpecFormat::Json);
    assert_eq!(SpecFormat::detect("a: 1"), SpecFormat::Yaml);
    let e = SpecErrors(vec![SpecError {
        path: "spec.sink".into(),
        line: Some(5),
        column: Some(1),
        message: "missing".into(),
    }]);
    assert_eq!(e.to_string(), "  - line 5, column 1: spec.sink: missing");
}

#[test]
fn generator_bounds_that_would_exhaust_memory_or_overflow_are_refused() {
    let text = with(
        "      total: 100000\n",
        "      total: 100000\n      partitions: 100000000\n",
    );
    let m = only(&text, "spec.source.generator.partitions", 13);
    assert!(m.contains("at most 65536"), "{m}");
    let m = only(
        &with(
            "{type: float, min: 0, max: 100}",
            "{type: float, min: -1e308, max: 1e308}",
        ),
        "spec.source.generator.fields.amount",
        18,
    );
    assert!(m.contains("finite"), "{m}");
    // The whole i64 range is valid (it used to panic at run time).
    parse_and_validate(&with(
        "{type: float, min: 0, max: 100}",
        "{type: int, min: -9223372036854775808, max: 9223372036854775807}",
    ))
    .expect("the full i64 range is a valid int field");
}

#[test]
fn a_paced_blackhole_takes_a_positive_rate() {
    let sink = "    file:\n      path: ./out/clicks-per-minute\n";
    let paced = with(sink, "    blackhole: {recordsPerSecond: 500}\n");
    let spec = parse_and_validate(&paced).expect("a paced blackhole is valid");
    assert_eq!(
        spec.spec.sink,
        crate::spec::SinkSpec::Blackhole(crate::spec::BlackholeSpec {
            records_per_second: Some(500)
        })
    );
    let m = only(
        &with(sink, "    blackhole: {recordsPerSecond: 0}\n"),
        "spec.sink.blackhole.recordsPerSecond",
        28,
    );
    assert!(m.contains("at least 1"), "{m}");
    // A plain blackhole still needs no settings.
    parse_and_validate(&with(sink, "    blackhole: {}\n")).expect("blackhole: {}");
}

#[test]
fn a_paced_file_source_takes_a_positive_rate() {
    let generator = "    generator:\n      total: 100000\n      eventTime:\n        step: 5ms\n        maxOutOfOrderness: 2s\n      fields:\n        user: {type: key, cardinality: 100, prefix: \"user-\"}\n        amount: {type: float, min: 0, max: 100}\n";
    let file = |rate: &str| {
        with(
            generator,
            &format!(
                "    file:\n      path: ./in\n      format: csv\n      schema: {{user: string, amount: float}}\n      recordsPerSecond: {rate}\n"
            ),
        )
    };
    let spec = parse_and_validate(&file("2000")).expect("a paced file source is valid");
    let crate::spec::SourceSpec::File(f) = &spec.spec.source else {
        panic!("not a file source: {:?}", spec.spec.source)
    };
    assert_eq!(f.records_per_second, Some(2000));
    let m = only(&file("0"), "spec.source.file.recordsPerSecond", 15);
    assert!(m.contains("at least 1"), "{m}");
}

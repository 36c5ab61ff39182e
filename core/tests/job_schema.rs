//! The JSON Schema of job specs (`JobSpec::json_schema`, what `ferry
//! schema` prints) checked against the spec parser, with a minimal
//! structural JSON Schema checker (the keywords schemars emits:
//! `$ref`, `type`, `properties`, `required`, `additionalProperties`,
//! `items`, `oneOf`, `anyOf`, `const`, `enum`, `minimum`), enough to
//! check that the schema and the spec parser agree.

use serde_json::{Value, json};

fn check(schema: &Value, root: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        return;
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix("#/$defs/")
            .and_then(|name| root["$defs"].get(name));
        match target {
            Some(t) => check(t, root, v, path, errs),
            None => errs.push(format!("{path}: unresolved $ref {r}")),
        }
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            errs.push(format!("{path}: {v} is not {types:?}"));
            return;
        }
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        errs.push(format!("{path}: {v} is not {c}"));
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(v)
    {
        errs.push(format!("{path}: {v} is not one of {options:?}"));
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < min
    {
        errs.push(format!("{path}: {n} < {min}"));
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(Value::Array(options)) = s.get(key) {
            let passing = options
                .iter()
                .filter(|o| {
                    let mut e = Vec::new();
                    check(o, root, v, path, &mut e);
                    e.is_empty()
                })
                .count();
            if passing == 0 || (exactly_one && passing > 1) {
                errs.push(format!("{path}: {passing} of the {key} options match"));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = s.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errs.push(format!("{path}: missing {r}"));
                }
            }
        }
        for (k, child) in obj {
            let p = format!("{path}.{k}");
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(ps), _) => check(ps, root, child, &p, errs),
                (None, Some(Value::Bool(false))) => errs.push(format!("{p}: not allowed")),
                (None, Some(extra)) => check(extra, root, child, &p, errs),
                (None, None) => {}
            }
        }
    }
    if let (Some(items), Some(list)) = (s.get("items"), v.as_array()) {
        for (i, item) in list.iter().enumerate() {
            check(items, root, item, &format!("{path}[{i}]"), errs);
        }
    }
}

fn errors(v: &Value) -> Vec<String> {
    let schema = ferry_core::spec::JobSpec::json_schema();
    let mut errs = Vec::new();
    check(&schema, &schema, v, "", &mut errs);
    errs
}

const EXAMPLE: &str = r#"
apiVersion: ferry.dev/v1
kind: Job
metadata:
  name: clicks-per-minute
spec:
  parallelism: 2
  checkpointing: {interval: 1s, retained: 3}
  restartStrategy: {type: fixed-attempts, attempts: 5, delay: 2s}
  source:
    generator:
      total: 100000
      eventTime: {step: 5ms, maxOutOfOrderness: 2s}
      fields:
        user: {type: key, cardinality: 100, prefix: "user-"}
        amount: {type: float, min: 0, max: 100}
        country: {type: choice, values: [de, fr]}
  operators:
    - filter: "amount > 10.0"
    - key_by: [user, country]
    - window:
        sliding: {size: 1m, slide: 10s}
        aggregate: {clicks: count, total: sum(amount)}
  sink:
    file:
      path: ./out/clicks-per-minute
"#;

#[test]
fn schema_is_documented() {
    let schema = ferry_core::spec::JobSpec::json_schema();
    assert_eq!(schema["title"], "Ferry Job");
    assert!(schema["description"].is_string());
    assert_eq!(schema["$defs"]["Duration"]["type"], "string");
    for (name, def) in schema["$defs"].as_object().unwrap() {
        assert!(def["description"].is_string(), "{name} has no description");
    }
}

#[test]
fn schema_accepts_a_parsed_example_spec() {
    let spec = ferry_core::spec::parse_and_validate(EXAMPLE).expect("example is valid");
    let value = serde_json::to_value(&spec).unwrap();
    assert_eq!(errors(&value), Vec::<String>::new());
}

#[test]
fn schema_rejects_what_the_parser_rejects() {
    let spec = ferry_core::spec::parse_and_validate(EXAMPLE).unwrap();
    let good = serde_json::to_value(&spec).unwrap();
    let bad_cases = [
        ("/spec/source", json!({"kafka": {}})),
        ("/spec/checkpointing/retained", json!("three")),
        ("/spec/operators/0", json!({"filter": "x", "map": {}})),
        ("/spec/checkpointing/interval", json!(5)),
    ];
    for (pointer, bad) in bad_cases {
        let mut v = good.clone();
        *v.pointer_mut(pointer).unwrap() = bad;
        assert!(!errors(&v).is_empty(), "schema accepted a bad {pointer}");
    }
    let mut v = good;
    v["spec"].as_object_mut().unwrap().remove("sink");
    assert!(
        !errors(&v).is_empty(),
        "schema accepted a spec without sink"
    );
}

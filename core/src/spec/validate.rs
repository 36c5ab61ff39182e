//! Semantic validation of a parsed spec: field references, expressions,
//! window settings, limits. It also derives the record schema after every
//! operator, which the runtime uses to build its operators.

use std::fmt;

use indexmap::IndexMap;

use crate::schema::Schema;
use crate::spec::expr::check_expr;
use crate::spec::{
    API_VERSION, GeneratorField, JobSpec, KIND_JOB, MAX_PARALLELISM, OperatorSpec, RestartStrategy,
    SinkSpec, SourceSpec, nats,
};
use crate::value::DataType;

/// One problem found in a spec: where (dotted field path) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

/// Aggregation functions of windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AggregateFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
}

impl fmt::Display for AggregateFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AggregateFn::Count => "count",
            AggregateFn::Sum => "sum",
            AggregateFn::Min => "min",
            AggregateFn::Max => "max",
            AggregateFn::Avg => "avg",
        })
    }
}

/// A parsed `aggregate` entry: output name, function, input field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregation {
    pub name: String,
    pub func: AggregateFn,
    pub field: Option<String>,
    pub output_type: DataType,
}

impl Aggregation {
    /// Parses `count`, `count()`, `sum(field)`, ... against `schema`.
    pub fn parse(name: &str, text: &str, schema: &Schema) -> Result<Self, String> {
        let t = text.trim();
        let (fname, arg) = match t.find('(') {
            Some(open) if t.ends_with(')') => {
                let arg = t[open + 1..t.len() - 1].trim();
                (
                    t[..open].trim(),
                    if arg.is_empty() { None } else { Some(arg) },
                )
            }
            Some(_) => return Err(format!("'{t}' is missing a closing ')'")),
            None => (t, None),
        };
        let func = match fname.to_ascii_lowercase().as_str() {
            "count" => AggregateFn::Count,
            "sum" => AggregateFn::Sum,
            "min" => AggregateFn::Min,
            "max" => AggregateFn::Max,
            "avg" => AggregateFn::Avg,
            other => {
                return Err(format!(
                    "unknown aggregation '{other}'; use count, sum(f), min(f), max(f) or avg(f)"
                ));
            }
        };
        let output_type = match (func, arg) {
            (AggregateFn::Count, None) => DataType::Int,
            (AggregateFn::Count, Some(a)) => {
                return Err(format!(
                    "count takes no field (got '{a}'); write just 'count'"
                ));
            }
            (_, None) => return Err(format!("{func} needs a field, e.g. {func}(amount)")),
            (_, Some(a)) => {
                let Some(f) = schema.field(a) else {
                    return Err(format!(
                        "unknown field '{a}' in {func}({a}) (fields here: {})",
                        schema.names().join(", ")
                    ));
                };
                let numeric = f.data_type.is_numeric()
                    || (f.data_type == DataType::Timestamp
                        && matches!(func, AggregateFn::Min | AggregateFn::Max));
                if !numeric {
                    return Err(format!(
                        "{func}({a}) needs a number, but '{a}' is {}",
                        f.data_type
                    ));
                }
                match func {
                    AggregateFn::Avg => DataType::Float,
                    AggregateFn::Sum if f.data_type == DataType::Int => DataType::Int,
                    AggregateFn::Sum => DataType::Float,
                    _ if f.data_type == DataType::Any => DataType::Float,
                    _ => f.data_type,
                }
            }
        };
        Ok(Aggregation {
            name: name.to_string(),
            func,
            field: arg.map(str::to_string),
            output_type,
        })
    }
}

/// Names of the window bound fields in window output.
pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

/// The schema of the source's records and after each operator.
#[derive(Clone, Debug)]
pub struct SchemaFlow {
    pub source: Schema,
    /// `after[i]` is the schema after `operators[i]`.
    pub after: Vec<Schema>,
    /// Key fields in force after each operator (`None` where not keyed).
    pub keys_after: Vec<Option<Vec<String>>>,
}

impl SchemaFlow {
    /// The schema the sink receives.
    pub fn sink_schema(&self) -> &Schema {
        self.after.last().unwrap_or(&self.source)
    }
}

/// Validates everything that typed parsing cannot, returning every problem.
pub fn validate_spec(spec: &JobSpec) -> Vec<Issue> {
    match output_schemas(spec) {
        Ok(_) => Vec::new(),
        Err(issues) => issues,
    }
}

/// Validates and derives the schema flow, or returns every problem found.
pub fn output_schemas(spec: &JobSpec) -> Result<SchemaFlow, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut push = |path: &str, message: String| {
        issues.push(Issue {
            path: path.to_string(),
            message,
        })
    };

    if spec.api_version != API_VERSION {
        push(
            "apiVersion",
            format!("must be '{API_VERSION}', found '{}'", spec.api_version),
        );
    }
    if spec.kind != KIND_JOB {
        push(
            "kind",
            format!("must be '{KIND_JOB}', found '{}'", spec.kind),
        );
    }
    if let Err(m) = check_name(&spec.metadata.name) {
        push("metadata.name", m);
    }
    if let Some(ns) = &spec.metadata.namespace
        && let Err(m) = check_name(ns)
    {
        push("metadata.namespace", m);
    }
    let body = &spec.spec;
    if body.parallelism == 0 || body.parallelism > MAX_PARALLELISM {
        push(
            "spec.parallelism",
            format!(
                "must be between 1 and {MAX_PARALLELISM}, found {}",
                body.parallelism
            ),
        );
    }
    let cp = &body.checkpointing;
    if cp.interval.as_millis() < 10 {
        push(
            "spec.checkpointing.interval",
            format!("must be at least 10ms, found {}", cp.interval),
        );
    }
    if cp.retained == 0 {
        push(
            "spec.checkpointing.retained",
            "must be at least 1 (restore needs a checkpoint)".into(),
        );
    }
    if !(cp.compact_ratio.is_finite() && cp.compact_ratio > 0.0 && cp.compact_ratio <= 100.0) {
        push(
            "spec.checkpointing.compactRatio",
            format!(
                "must be a number above 0 and at most 100 (the deltas' size as a multiple of the full snapshot's), found {}",
                cp.compact_ratio
            ),
        );
    }
    if cp.timeout.as_millis() < 100 {
        push(
            "spec.checkpointing.timeout",
            format!("must be at least 100ms, found {}", cp.timeout),
        );
    }
    if let Some(Err(e)) = cp
        .storage
        .as_ref()
        .map(|u| crate::storage::StorageLocation::parse(u))
    {
        push("spec.checkpointing.storage", e.to_string());
    }
    match &body.restart_strategy {
        RestartStrategy::ExponentialDelay {
            initial_delay,
            max_delay,
            multiplier,
            jitter,
            ..
        } => {
            if *multiplier < 1.0 || !multiplier.is_finite() {
                push(
                    "spec.restartStrategy.multiplier",
                    format!("must be at least 1.0, found {multiplier}"),
                );
            }
            if !(0.0..=1.0).contains(jitter) {
                push(
                    "spec.restartStrategy.jitter",
                    format!("must be between 0 and 1, found {jitter}"),
                );
            }
            if max_delay < initial_delay {
                push(
                    "spec.restartStrategy.maxDelay",
                    format!("must not be below initialDelay ({initial_delay}), found {max_delay}"),
                );
            }
        }
        RestartStrategy::FixedAttempts { attempts, .. } => {
            if *attempts == 0 {
                push(
                    "spec.restartStrategy.attempts",
                    "must be at least 1; use `type: none` for no restarts".into(),
                );
            }
        }
        RestartStrategy::None => {}
    }

    // Source and its schema.
    /// Generator partitions are state each subtask holds and checkpoints.
    const MAX_GENERATOR_PARTITIONS: u32 = 65_536;
    let mut schema = Schema::default();
    match &body.source {
        SourceSpec::Generator(g) => {
            let p = "spec.source.generator";
            match g.partitions {
                Some(0) => push(&format!("{p}.partitions"), "must be at least 1".into()),
                Some(n) if n > MAX_GENERATOR_PARTITIONS => push(
                    &format!("{p}.partitions"),
                    format!("must be at most {MAX_GENERATOR_PARTITIONS}, found {n}"),
                ),
                _ => {}
            }
            if g.fields.is_empty() {
                push(
                    &format!("{p}.fields"),
                    "must list at least one field".into(),
                );
            }
            if crate::value::parse_ts(&g.event_time.start).is_none() {
                push(
                    &format!("{p}.eventTime.start"),
                    format!(
                        "'{}' is not an RFC 3339 time; write e.g. 2026-01-01T00:00:00Z",
                        g.event_time.start
                    ),
                );
            }
            if let Some(late) = g
                .event_time
                .late
                .as_ref()
                .filter(|l| !(0.0..=1.0).contains(&l.fraction))
            {
                push(
                    &format!("{p}.eventTime.late.fraction"),
                    format!("must be between 0 and 1, found {}", late.fraction),
                );
            }
            for (name, f) in &g.fields {
                let fp = format!("{p}.fields.{name}");
                let ty = match f {
                    GeneratorField::Key {
                        cardinality,
                        prefix,
                    } => {
                        if *cardinality == 0 {
                            push(&format!("{fp}.cardinality"), "must be at least 1".into());
                        }
                        if *cardinality > 100_000_000 {
                            push(
                                &format!("{fp}.cardinality"),
                                "must be at most 100000000".into(),
                            );
                        }
                        if prefix.is_some() {
                            DataType::String
                        } else {
                            DataType::Int
                        }
                    }
                    GeneratorField::Int { min, max } => {
                        if min > max {
                            push(&fp, format!("min ({min}) is greater than max ({max})"));
                        }
                        DataType::Int
                    }
                    GeneratorField::Float { min, max } => {
                        // Also rejects NaN bounds.
                        if min.partial_cmp(max) != Some(std::cmp::Ordering::Less) {
                            push(&fp, format!("min ({min}) must be below max ({max})"));
                        } else if !(max - min).is_finite() {
                            push(
                                &fp,
                                format!("max - min must be a finite number, found {min}..{max}"),
                            );
                        }
                        DataType::Float
                    }
                    GeneratorField::Choice { values } => {
                        if values.is_empty() {
                            push(
                                &format!("{fp}.values"),
                                "must list at least one value".into(),
                            );
                        }
                        DataType::String
                    }
                    GeneratorField::Sequence => DataType::Int,
                };
                if name == &g.event_time.field {
                    push(
                        &fp,
                        format!(
                            "'{name}' is also the event-time field; rename it or set eventTime.field"
                        ),
                    );
                }
                check_field_name(name, &fp, &mut push);
                schema.fields.push(crate::schema::Field {
                    name: name.clone(),
                    data_type: ty,
                });
            }
            schema.fields.push(crate::schema::Field {
                name: g.event_time.field.clone(),
                data_type: DataType::Timestamp,
            });
        }
        SourceSpec::File(f) => {
            let p = "spec.source.file";
            if let Err(e) = crate::storage::StorageLocation::parse(&f.path) {
                push(&format!("{p}.path"), e.to_string());
            }
            if f.delimiter.chars().count() != 1 || !f.delimiter.is_ascii() {
                push(
                    &format!("{p}.delimiter"),
                    format!("must be one ASCII character, found '{}'", f.delimiter),
                );
            }
            declared_schema(&f.schema, p, &mut schema, &mut push);
            if let Some(et) = &f.event_time {
                check_event_time_field(&schema, &et.field, p, &mut push);
            }
            if f.records_per_second == Some(0) {
                push(
                    &format!("{p}.recordsPerSecond"),
                    "must be at least 1 (leave it out for no limit)".to_string(),
                );
            }
        }
        SourceSpec::Nats(n) => {
            let p = "spec.source.nats";
            nats::check_source(n, p, &mut push);
            declared_schema(&n.schema, p, &mut schema, &mut push);
            if let Some(field) = n.event_time.as_ref().and_then(|e| e.field.as_ref()) {
                check_event_time_field(&schema, field, p, &mut push);
            }
        }
    }
    let source_schema = schema.clone();

    // Operators.
    let mut after = Vec::new();
    let mut keys_after = Vec::new();
    let mut keys: Option<Vec<String>> = None;
    let mut window_count = 0;
    let mut window_names: Vec<String> = Vec::new();
    for (i, op) in body.operators.iter().enumerate() {
        let p = format!("spec.operators[{i}]");
        match op {
            OperatorSpec::Filter(expr) => match check_expr(expr, &schema) {
                Ok(DataType::Bool) | Ok(DataType::Any) => {}
                Ok(other) => push(
                    &format!("{p}.filter"),
                    format!("must be a condition (bool), but '{expr}' is {other}"),
                ),
                Err(e) => push(&format!("{p}.filter"), e),
            },
            OperatorSpec::Map(fields) => {
                if fields.is_empty() {
                    push(&format!("{p}.map"), "must define at least one field".into());
                }
                let mut out = Schema::default();
                for (name, expr) in fields {
                    let fp = format!("{p}.map.{name}");
                    check_field_name(name, &fp, &mut push);
                    let ty = match check_expr(expr, &schema) {
                        Ok(t) => t,
                        Err(e) => {
                            push(&fp, e);
                            DataType::Any
                        }
                    };
                    out.fields.push(crate::schema::Field {
                        name: name.clone(),
                        data_type: ty,
                    });
                }
                schema = out;
                keys = None;
            }
            OperatorSpec::KeyBy(k) => {
                let fields = k.fields();
                if fields.is_empty() {
                    push(
                        &format!("{p}.key_by"),
                        "must name at least one field".into(),
                    );
                }
                for f in &fields {
                    if schema.index_of(f).is_none() {
                        push(
                            &format!("{p}.key_by"),
                            format!(
                                "unknown field '{f}' (fields here: {})",
                                schema.names().join(", ")
                            ),
                        );
                    }
                }
                keys = Some(fields);
            }
            OperatorSpec::Window(w) => {
                window_count += 1;
                let name = w.name.clone().unwrap_or_else(|| {
                    if window_count == 1 {
                        "window".to_string()
                    } else {
                        format!("window-{window_count}")
                    }
                });
                if window_names.contains(&name) {
                    push(
                        &format!("{p}.window.name"),
                        format!("'{name}' is used by another window; names must be unique"),
                    );
                }
                window_names.push(name);
                let wp = format!("{p}.window");
                match (&w.tumbling, &w.sliding) {
                    (Some(t), None) => {
                        if t.as_millis() <= 0 {
                            push(&format!("{wp}.tumbling"), "must be longer than 0".into());
                        }
                    }
                    (None, Some(s)) => {
                        if s.slide.as_millis() <= 0 || s.size.as_millis() <= 0 {
                            push(
                                &format!("{wp}.sliding"),
                                "size and slide must be longer than 0".into(),
                            );
                        } else if s.size.as_millis() % s.slide.as_millis() != 0 {
                            push(
                                &format!("{wp}.sliding.size"),
                                format!(
                                    "must be a multiple of slide ({}), found {}",
                                    s.slide, s.size
                                ),
                            );
                        } else if s.size.as_millis() / s.slide.as_millis() > 1000 {
                            push(
                                &format!("{wp}.sliding.slide"),
                                "a record would belong to more than 1000 windows; use a larger slide"
                                    .into(),
                            );
                        }
                    }
                    (Some(_), Some(_)) => {
                        push(&wp, "set either 'tumbling' or 'sliding', not both".into())
                    }
                    (None, None) => push(
                        &wp,
                        "needs a size: 'tumbling: 1m' or 'sliding: {size: 1m, slide: 10s}'".into(),
                    ),
                }
                let Some(key_fields) = keys.clone() else {
                    push(
                        &wp,
                        "needs a keyed stream: put a 'key_by' before the window (a 'map' ends keying)"
                            .into(),
                    );
                    after.push(schema.clone());
                    keys_after.push(keys.clone());
                    continue;
                };
                if w.aggregate.is_empty() {
                    push(
                        &format!("{wp}.aggregate"),
                        "must define at least one aggregation, e.g. 'clicks: count'".into(),
                    );
                }
                let mut out = Schema::default();
                for k in &key_fields {
                    let ty = schema
                        .field(k)
                        .map(|f| f.data_type)
                        .unwrap_or(DataType::Any);
                    out.fields.push(crate::schema::Field {
                        name: k.clone(),
                        data_type: ty,
                    });
                }
                for n in [WINDOW_START, WINDOW_END] {
                    out.fields.push(crate::schema::Field {
                        name: n.to_string(),
                        data_type: DataType::Timestamp,
                    });
                }
                for (name, text) in &w.aggregate {
                    let ap = format!("{wp}.aggregate.{name}");
                    check_field_name(name, &ap, &mut push);
                    if out.index_of(name).is_some() {
                        push(
                            &ap,
                            format!("'{name}' clashes with a key or window field; rename it"),
                        );
                        continue;
                    }
                    match Aggregation::parse(name, text, &schema) {
                        Ok(a) => out.fields.push(crate::schema::Field {
                            name: name.clone(),
                            data_type: a.output_type,
                        }),
                        Err(e) => push(&ap, e),
                    }
                }
                schema = out;
            }
        }
        after.push(schema.clone());
        keys_after.push(keys.clone());
    }

    match &body.sink {
        SinkSpec::File(f) => {
            if let Err(e) = crate::storage::StorageLocation::parse(&f.path) {
                push("spec.sink.file.path", e.to_string());
            }
        }
        SinkSpec::Nats(n) => {
            nats::check_sink(n, &schema, "spec.sink.nats", &mut push);
        }
        SinkSpec::Blackhole(b) => {
            if b.records_per_second == Some(0) {
                push(
                    "spec.sink.blackhole.recordsPerSecond",
                    "must be at least 1 (leave it out for no limit)".to_string(),
                );
            }
        }
        SinkSpec::Stdout(_) => {}
    }

    if issues.is_empty() {
        Ok(SchemaFlow {
            source: source_schema,
            after,
            keys_after,
        })
    } else {
        Err(issues)
    }
}

/// Adds a source's declared fields to `schema`, checking that there are
/// some and their names.
fn declared_schema(
    fields: &IndexMap<String, DataType>,
    source_path: &str,
    schema: &mut Schema,
    push: &mut impl FnMut(&str, String),
) {
    if fields.is_empty() {
        push(
            &format!("{source_path}.schema"),
            "must list at least one field".into(),
        );
    }
    for (name, ty) in fields {
        check_field_name(name, &format!("{source_path}.schema.{name}"), push);
        schema.fields.push(crate::schema::Field {
            name: name.clone(),
            data_type: *ty,
        });
    }
}

/// An event-time field must be a declared `timestamp` or `int` field.
fn check_event_time_field(
    schema: &Schema,
    field: &str,
    source_path: &str,
    push: &mut impl FnMut(&str, String),
) {
    let path = format!("{source_path}.eventTime.field");
    match schema.field(field).map(|f| f.data_type) {
        None => push(
            &path,
            format!(
                "'{field}' is not in the schema (fields: {})",
                schema.names().join(", ")
            ),
        ),
        Some(DataType::Timestamp) | Some(DataType::Int) => {}
        Some(other) => push(
            &path,
            format!("'{field}' must be a timestamp, but it is {other}"),
        ),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name: use 1-63 lowercase letters, digits and '-', starting with a letter"
        ))
    }
}

fn check_field_name(name: &str, path: &str, push: &mut impl FnMut(&str, String)) {
    let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        push(
            path,
            format!(
                "'{name}' is not a valid field name: use letters, digits and '_', starting with a letter"
            ),
        );
    }
}

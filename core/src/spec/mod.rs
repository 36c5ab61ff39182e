//! The job spec: what a user submits (`apiVersion: ferry.dev/v1`, `kind: Job`)
//! as YAML or JSON, its parsing with field paths and line numbers, and its
//! validation into a checked form the runtime can trust.
//!
//! Invariant: a [`JobSpec`] that passed [`parse_and_validate`] names only
//! fields that exist at the point where they are used, has compilable
//! expressions, and has consistent window, checkpoint and restart settings.

mod duration;
pub mod expr;
pub mod nats;
mod parse;
mod validate;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use duration::DurationSpec;
pub use nats::{NatsEventTime, NatsFormat, NatsSinkSpec, NatsSourceSpec, StartFrom};
pub use parse::{SpecError, SpecErrors, SpecFormat, parse_and_validate, parse_spec};
pub use validate::{
    AggregateFn, Aggregation, Issue, SchemaFlow, WINDOW_END, WINDOW_START, output_schemas,
    validate_spec,
};

/// API version this build understands.
pub const API_VERSION: &str = "ferry.dev/v1";
/// The only kind so far.
pub const KIND_JOB: &str = "Job";

/// A complete job specification.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(
    title = "Ferry Job",
    description = "A Ferry stream-processing job (ferry.dev/v1)."
)]
pub struct JobSpec {
    /// Must be `ferry.dev/v1`.
    pub api_version: String,
    /// Must be `Job`.
    pub kind: String,
    pub metadata: Metadata,
    pub spec: JobBody,
}

/// Name and labels of a job.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Lowercase letters, digits and '-', 1 to 63 characters, starting with a letter.
    pub name: String,
    /// The namespace the job belongs to (default `default`), with the same
    /// rules as `name`. API roles are granted per namespace
    /// (`payments:operator`); see docs/security.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Free-form labels shown by `ferry job list`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub labels: IndexMap<String, String>,
}

/// What the job does and how it is kept alive.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobBody {
    /// Number of parallel subtasks of every operator, 1 to 1024 (default 1).
    #[serde(default = "default_parallelism", deserialize_with = "de_parallelism")]
    #[schemars(range(min = 1, max = 1024))]
    pub parallelism: u32,
    #[serde(default)]
    pub checkpointing: Checkpointing,
    #[serde(default)]
    pub restart_strategy: RestartStrategy,
    pub source: SourceSpec,
    /// Applied in order; `key_by` repartitions the stream by key.
    #[serde(default)]
    pub operators: Vec<OperatorSpec>,
    pub sink: SinkSpec,
}

fn default_parallelism() -> u32 {
    1
}

/// The largest `spec.parallelism` (checked by validation).
pub const MAX_PARALLELISM: u32 = 1024;

/// Reads `spec.parallelism` as any `u32`, saying what the field really
/// takes when the value is not a whole number at all ("expected a whole
/// number from 1 to 1024, found the text 'two'") instead of the type's
/// range (0 to 4294967295). The range itself is checked by validation, with
/// the value found ("must be between 1 and 1024, found 0").
fn de_parallelism<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};
    struct Parallelism;
    impl Visitor<'_> for Parallelism {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a whole number from 1 to {MAX_PARALLELISM}")
        }
        fn visit_u64<E: Error>(self, n: u64) -> Result<u32, E> {
            u32::try_from(n).map_err(|_| E::invalid_value(Unexpected::Unsigned(n), &self))
        }
        fn visit_i64<E: Error>(self, n: i64) -> Result<u32, E> {
            u32::try_from(n).map_err(|_| E::invalid_value(Unexpected::Signed(n), &self))
        }
    }
    d.deserialize_u32(Parallelism)
}

/// Periodic, aligned checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpointing {
    /// Time between checkpoint triggers (default 5s).
    #[serde(default = "default_cp_interval")]
    pub interval: DurationSpec,
    /// How many completed checkpoints to keep (default 3, at least 1).
    #[serde(default = "default_retained")]
    pub retained: u32,
    /// Object store URL of the checkpoint root (`file://`, `s3://`, `gs://`,
    /// `az://`, or a plain path). Default: the data directory of the process
    /// (`./ferry-data` for `ferry local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// A checkpoint not complete after this long is abandoned (default 60s).
    #[serde(default = "default_cp_timeout")]
    pub timeout: DurationSpec,
    /// How many checkpoints may fail in a row (a store outage, a full disk,
    /// timeouts) before the job restarts from its last completed one
    /// (default 5). The job keeps running meanwhile.
    #[serde(default = "default_tolerable_failures")]
    pub tolerable_failures: u32,
    /// Incremental checkpoints (default false): each operator subtask
    /// uploads only what changed since its previous checkpoint (a delta),
    /// and later checkpoints list the earlier files again instead of
    /// writing them anew. Savepoints stay full.
    #[serde(default = "default_incremental")]
    pub incremental: bool,
    /// With `incremental`: a full snapshot is written again once the deltas
    /// since the last one add up to this multiple of its size (default 2;
    /// a restore then reads at most 1 + this times the state). Lower
    /// restores faster, higher uploads less.
    #[serde(default = "default_compact_ratio")]
    pub compact_ratio: f64,
}

fn default_incremental() -> bool {
    true
}

fn default_compact_ratio() -> f64 {
    2.0
}

fn default_cp_interval() -> DurationSpec {
    DurationSpec::from_millis(5_000)
}
fn default_retained() -> u32 {
    3
}
fn default_cp_timeout() -> DurationSpec {
    DurationSpec::from_millis(60_000)
}
fn default_tolerable_failures() -> u32 {
    5
}

impl Default for Checkpointing {
    fn default() -> Self {
        Self {
            interval: default_cp_interval(),
            retained: default_retained(),
            storage: None,
            timeout: default_cp_timeout(),
            tolerable_failures: default_tolerable_failures(),
            incremental: default_incremental(),
            compact_ratio: default_compact_ratio(),
        }
    }
}

/// What happens when a task fails: restart the job from its last checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RestartStrategy {
    /// Delays grow by `multiplier` from `initialDelay` up to `maxDelay`, with
    /// random `jitter`; after `resetAfter` without failure they start over.
    #[serde(rename_all = "camelCase")]
    ExponentialDelay {
        #[serde(default = "default_initial_delay")]
        initial_delay: DurationSpec,
        #[serde(default = "default_max_delay")]
        max_delay: DurationSpec,
        #[serde(default = "default_multiplier")]
        multiplier: f64,
        /// Fraction of the delay added or removed at random (0 to 1).
        #[serde(default = "default_jitter")]
        jitter: f64,
        #[serde(default = "default_reset_after")]
        reset_after: DurationSpec,
    },
    /// Up to `attempts` restarts, `delay` apart; then the job fails.
    #[serde(rename_all = "camelCase")]
    FixedAttempts {
        #[serde(default = "default_attempts")]
        attempts: u32,
        #[serde(default = "default_initial_delay")]
        delay: DurationSpec,
    },
    /// The first failure fails the job.
    None,
}

fn default_initial_delay() -> DurationSpec {
    DurationSpec::from_millis(1_000)
}
fn default_max_delay() -> DurationSpec {
    DurationSpec::from_millis(60_000)
}
fn default_multiplier() -> f64 {
    1.5
}
fn default_jitter() -> f64 {
    0.1
}
fn default_reset_after() -> DurationSpec {
    DurationSpec::from_millis(600_000)
}
fn default_attempts() -> u32 {
    3
}

impl RestartStrategy {
    /// The longest wait before a restart this strategy can choose (jitter
    /// included); zero when it never restarts.
    pub fn longest_delay(&self) -> std::time::Duration {
        match self {
            RestartStrategy::ExponentialDelay {
                max_delay, jitter, ..
            } => max_delay.get().mul_f64(1.0 + jitter.clamp(0.0, 1.0)),
            RestartStrategy::FixedAttempts { delay, .. } => delay.get(),
            RestartStrategy::None => std::time::Duration::ZERO,
        }
    }
}

impl Default for RestartStrategy {
    fn default() -> Self {
        RestartStrategy::ExponentialDelay {
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
            reset_after: default_reset_after(),
        }
    }
}

/// Exactly one source.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    Generator(GeneratorSpec),
    File(FileSourceSpec),
    /// A NATS JetStream stream (offset = stream sequence).
    Nats(NatsSourceSpec),
}

/// A deterministic, partitioned, replayable generator of records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratorSpec {
    /// Number of partitions (default: the job's parallelism).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Total records over all partitions; absent means unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Records per second over all partitions; 0 (default) means as fast as possible.
    #[serde(default)]
    pub rate: u64,
    /// Seed of the deterministic value generator.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub event_time: GeneratorEventTime,
    /// Fields to generate, in output order.
    pub fields: IndexMap<String, GeneratorField>,
}

/// Event time of generated records: record `i` (over all partitions) has
/// time `start + i × step`, moved back by up to `maxOutOfOrderness`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GeneratorEventTime {
    /// RFC 3339 time of the first record (default 2026-01-01T00:00:00Z).
    #[serde(default = "default_gen_start")]
    pub start: String,
    /// Event-time advance per record (default 1ms).
    #[serde(default = "default_gen_step")]
    pub step: DurationSpec,
    /// Bound on disorder; also the watermark delay (default 0s).
    #[serde(default)]
    pub max_out_of_orderness: DurationSpec,
    /// Name of the timestamp field added to every record (default `ts`).
    #[serde(default = "default_ts_field")]
    pub field: String,
    /// Optionally make a fraction of records arrive late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late: Option<LateRecords>,
}

fn default_gen_start() -> String {
    "2026-01-01T00:00:00Z".to_string()
}
fn default_gen_step() -> DurationSpec {
    DurationSpec::from_millis(1)
}
fn default_ts_field() -> String {
    "ts".to_string()
}

impl Default for GeneratorEventTime {
    fn default() -> Self {
        Self {
            start: default_gen_start(),
            step: default_gen_step(),
            max_out_of_orderness: DurationSpec::from_millis(0),
            field: default_ts_field(),
            late: None,
        }
    }
}

/// Late records: `fraction` of records carry a time `by` older than their slot.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LateRecords {
    /// Between 0 and 1.
    pub fraction: f64,
    pub by: DurationSpec,
}

/// How one generated field gets its values (a pure function of seed, record
/// index and field, so a replay yields the same values).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GeneratorField {
    /// Uniform key among `cardinality` keys: strings `<prefix><n>` when a
    /// prefix is given, integers `0..cardinality` otherwise.
    Key {
        cardinality: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// Uniform integer in `[min, max]`.
    Int { min: i64, max: i64 },
    /// Uniform float in `[min, max)`.
    Float { min: f64, max: f64 },
    /// One of the given strings, uniformly.
    Choice { values: Vec<String> },
    /// The record's global index (0, 1, 2, ...).
    Sequence,
}

/// Records from files in an object store: JSON lines or CSV.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSourceSpec {
    /// Object store URL of a directory or file; the last path segment may
    /// contain `*` wildcards (e.g. `file:///data/clicks/*.jsonl`).
    pub path: String,
    pub format: FileFormat,
    /// Field names and types, in output order.
    pub schema: IndexMap<String, DataType>,
    /// CSV only: first line is a header (default true).
    #[serde(default = "default_true")]
    pub header: bool,
    /// CSV only: field delimiter (default `,`).
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Which field holds event time, and how out of order it may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<FileEventTime>,
    /// What a malformed line does: `fail` the job (default) or `skip` it,
    /// logging it with its file and line number and counting it.
    #[serde(default)]
    pub on_bad_line: BadLinePolicy,
    /// Read at most this many records per second per subtask (none: as
    /// fast as the files allow): replay a backlog without swamping the sink,
    /// or feed a drill a steady stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_per_second: Option<u64>,
}

/// What the file source does with a line it cannot turn into a record
/// (invalid JSON or UTF-8, wrong CSV column count, a value that does not fit
/// its declared type, a missing event time).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BadLinePolicy {
    /// Fail the job at once, naming the file and line; it is not restarted,
    /// since a restart would read the same line again.
    #[default]
    Fail,
    /// Skip the line: log it (file, line, reason) and count it in
    /// `ferry_job_skipped_records_total`.
    Skip,
}

pub use crate::value::DataType;

fn default_true() -> bool {
    true
}
fn default_delimiter() -> String {
    ",".to_string()
}

/// File formats the file source reads.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Jsonl,
    Csv,
}

/// Event time taken from a field of the file's records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileEventTime {
    /// A `timestamp` field of the schema (RFC 3339 or epoch milliseconds).
    pub field: String,
    #[serde(default)]
    pub max_out_of_orderness: DurationSpec,
}

/// One processing step.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OperatorSpec {
    /// Keep records for which this CEL expression is true.
    Filter(String),
    /// Replace each record by these fields, each a CEL expression over the input.
    Map(IndexMap<String, String>),
    /// Partition the stream by these fields (one name or a list).
    KeyBy(KeyFields),
    /// Event-time window over a keyed stream.
    Window(WindowSpec),
}

/// One key field or several.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum KeyFields {
    One(String),
    Many(Vec<String>),
}

impl KeyFields {
    pub fn fields(&self) -> Vec<String> {
        match self {
            KeyFields::One(f) => vec![f.clone()],
            KeyFields::Many(v) => v.clone(),
        }
    }
}

/// A tumbling or sliding event-time window with aggregations.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WindowSpec {
    /// Stable operator name used for its state in checkpoints (default
    /// `window`, `window-2`, ... by position among windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size of a tumbling window, e.g. `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tumbling: Option<DurationSpec>,
    /// Size and slide of a sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding: Option<SlidingSpec>,
    /// Records up to this much behind the watermark still update their window
    /// (which then fires again with the updated result). Default 0s.
    #[serde(default)]
    pub allowed_lateness: DurationSpec,
    /// Output field name → aggregation: `count`, `sum(f)`, `min(f)`, `max(f)`, `avg(f)`.
    pub aggregate: IndexMap<String, String>,
}

/// Size and slide of a sliding window; size must be a multiple of slide.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlidingSpec {
    pub size: DurationSpec,
    pub slide: DurationSpec,
}

/// Exactly one sink.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    /// Exactly-once JSON-lines part files, committed with each checkpoint.
    File(FileSinkSpec),
    /// Print records as JSON lines (at-least-once; for demos).
    Stdout(EmptySpec),
    /// Count and drop (for benchmarks), optionally no faster than a rate.
    Blackhole(BlackholeSpec),
    /// Exactly-once (within the stream's duplicate window) JSON messages on
    /// a NATS JetStream stream, published when their checkpoint completes.
    Nats(NatsSinkSpec),
}

/// Settings of the file sink.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileSinkSpec {
    /// Object store URL (or plain path) of the output directory.
    pub path: String,
}

/// Settings of the blackhole sink.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlackholeSpec {
    /// Take at most this many records per second per subtask (none: as
    /// fast as they come): a stand-in for a slow external system, to
    /// rehearse backpressure.
    #[serde(default)]
    pub records_per_second: Option<u64>,
}

/// A sink without settings (`stdout: {}`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EmptySpec {}

/// The namespace of a job whose spec names none.
pub const DEFAULT_NAMESPACE: &str = "default";

impl Metadata {
    /// The job's namespace: `metadata.namespace`, or `default`.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

impl JobSpec {
    /// Renders the spec back as YAML (what the job store keeps).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }

    /// JSON Schema of the spec, for editors (`ferry schema`).
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(JobSpec)).unwrap_or_default()
    }
}

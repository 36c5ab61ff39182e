//! Batches on the wire between TaskManagers, as Arrow IPC stream messages
//! (ADR 0007): [`BatchEncoder`] on the sending end of a channel,
//! [`BatchDecoder`] on the receiving end.
//!
//! A batch's columns are typed per batch (a column is `Any` when its
//! values disagree), so the Arrow schema follows the batch's layout: `Bool`,
//! `Int`, `Float`, `Str` and `Ts` columns become boolean, int64, float64,
//! utf8 and timestamp(ms) arrays, an `Any` column a dense union of those
//! and null, and the event times one more int64 column, [`EVENT_TIME`]. A
//! batch whose layout differs from the one before starts a new IPC stream
//! (its schema message first); a steady channel sends its schema once.
//!
//! A `Ts` column equal to the batch's event times (an event time taken
//! from a field, as most jobs take it) goes as an Arrow null column, which
//! has no buffers: the receiver copies the event times into it, and the
//! field does not cross twice.
//!
//! A `Str` column goes as a dictionary (Arrow's dictionary encoding, 16-bit
//! codes, with delta dictionary messages): each distinct string crosses
//! once per stream, then every row is two bytes, and the receiver turns a
//! code into the one `Arc` it keeps per string. Keys repeat, so this halves
//! what a keyed exchange sends. A column whose strings do not repeat gains
//! nothing: once its dictionary would pass [`MAX_DICTIONARY`] strings, or
//! keeping it up (copying the grown dictionary into a new array for the
//! writer) costs more than [`UPKEEP_PER_ROW`] strings per row sent, the
//! column goes as plain utf8 for the rest of the channel.
//!
//! Invariant: decoding a message never panics out of [`BatchDecoder::decode`]
//! and never allocates more than the message allows: a message is at most
//! the decoder's bound, holds exactly one record batch, and its schema must
//! name the fields the receiver's plan expects, in order; anything else is
//! a [`CodecError`]. (arrow-ipc panics on some messages whose buffer
//! offsets lie; the decoder contains that panic, reports the message as
//! malformed, and needs a new stream before it takes another batch.)

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType, UInt16Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, NullArray, RecordBatch, StringArray,
    TimestampMillisecondArray, UnionArray,
};
use arrow_buffer::{Buffer, ScalarBuffer};
use arrow_ipc::reader::StreamDecoder;
use arrow_ipc::writer::{DictionaryHandling, IpcWriteOptions, StreamWriter};
use arrow_schema::{DataType as ArrowType, Field as ArrowField, Schema as ArrowSchema, TimeUnit};
use arrow_schema::{UnionFields, UnionMode};
use bytes::Bytes;
use ferry_core::schema::{Schema, SchemaRef};
use ferry_core::value::Value;

use crate::batch::{Batch, Column};

/// Name of the column that carries a batch's event times.
pub const EVENT_TIME: &str = "__ferry_event_time";

/// Largest message a decoder takes by default, in bytes.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Most distinct strings a column's dictionary holds (its codes are 16
/// bits); a decoder refuses a bigger one.
pub const MAX_DICTIONARY: usize = 1 << 16;
/// Strings copied into grown dictionaries a column may cost per row sent
/// with it (after [`DICTIONARY_WARMUP`]) before it goes plain.
pub const UPKEEP_PER_ROW: usize = 4;
/// Strings copied into grown dictionaries that do not count against
/// [`UPKEEP_PER_ROW`]: a channel's first batches fill its dictionary.
const DICTIONARY_WARMUP: usize = 1 << 18;

/// Why a batch could not be encoded or a message decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("exchange: {0}")]
pub struct CodecError(pub String);

impl From<arrow_schema::ArrowError> for CodecError {
    fn from(e: arrow_schema::ArrowError) -> Self {
        CodecError(format!("Arrow IPC: {e}"))
    }
}

/// One message of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The message starts a new IPC stream: a schema message comes first.
    pub new_stream: bool,
    /// Arrow IPC stream bytes (on the receiving side, a slice of the
    /// buffer the frame was decoded from).
    pub bytes: Bytes,
}

/// The physical type of each column of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
    Ts,
    Any,
    /// A `Str` column as a dictionary.
    Dict,
    /// A `Ts` column equal to the batch's event times, sent as an Arrow
    /// null column (no buffers): the receiver copies the event times.
    EventTime,
}

fn kind(c: &Column) -> Kind {
    match c {
        Column::Bool(_) => Kind::Bool,
        Column::Int(_) => Kind::Int,
        Column::Float(_) => Kind::Float,
        Column::Str(_) => Kind::Str,
        Column::Ts(_) => Kind::Ts,
        Column::Any(_) => Kind::Any,
    }
}

/// The children of an `Any` column's dense union, by type id.
fn union_fields() -> UnionFields {
    let ts = ArrowType::Timestamp(TimeUnit::Millisecond, None);
    UnionFields::try_new(
        0..6,
        [
            ArrowField::new("null", ArrowType::Null, true),
            ArrowField::new("bool", ArrowType::Boolean, false),
            ArrowField::new("int", ArrowType::Int64, false),
            ArrowField::new("float", ArrowType::Float64, false),
            ArrowField::new("str", ArrowType::Utf8, false),
            ArrowField::new("ts", ts, false),
        ],
    )
    .expect("six distinct type ids")
}

fn arrow_type(k: Kind) -> ArrowType {
    match k {
        Kind::Bool => ArrowType::Boolean,
        Kind::Int => ArrowType::Int64,
        Kind::Float => ArrowType::Float64,
        Kind::Str => ArrowType::Utf8,
        Kind::Ts => ArrowType::Timestamp(TimeUnit::Millisecond, None),
        Kind::Any => ArrowType::Union(union_fields(), UnionMode::Dense),
        Kind::Dict => dictionary_type(),
        Kind::EventTime => ArrowType::Null,
    }
}

fn dictionary_type() -> ArrowType {
    ArrowType::Dictionary(Box::new(ArrowType::UInt16), Box::new(ArrowType::Utf8))
}

fn any_array(values: &[Value]) -> Result<ArrayRef, CodecError> {
    let (mut nulls, mut bools, mut ints, mut floats, mut strs, mut tss) = (
        0usize,
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut type_ids = Vec::with_capacity(values.len());
    let mut offsets = Vec::with_capacity(values.len());
    for v in values {
        let (id, at) = match v {
            Value::Null => {
                nulls += 1;
                (0, nulls - 1)
            }
            Value::Bool(b) => {
                bools.push(*b);
                (1, bools.len() - 1)
            }
            Value::Int(i) => {
                ints.push(*i);
                (2, ints.len() - 1)
            }
            Value::Float(f) => {
                floats.push(*f);
                (3, floats.len() - 1)
            }
            Value::Str(s) => {
                strs.push(s.clone());
                (4, strs.len() - 1)
            }
            Value::Ts(t) => {
                tss.push(*t);
                (5, tss.len() - 1)
            }
        };
        type_ids.push(id as i8);
        offsets.push(
            i32::try_from(at).map_err(|_| CodecError("a column of over 2^31 values".into()))?,
        );
    }
    let children: Vec<ArrayRef> = vec![
        Arc::new(NullArray::new(nulls)),
        Arc::new(BooleanArray::from(bools)),
        Arc::new(Int64Array::from(ints)),
        Arc::new(Float64Array::from(floats)),
        Arc::new(StringArray::from_iter_values(strs.iter().map(|s| &**s))),
        Arc::new(TimestampMillisecondArray::from(tss)),
    ];
    Ok(Arc::new(UnionArray::try_new(
        union_fields(),
        ScalarBuffer::from(type_ids),
        Some(ScalarBuffer::from(offsets)),
        children,
    )?))
}

/// `c` as an Arrow array; numeric columns hand their vectors over
/// without a copy.
fn to_arrow(c: Column) -> Result<ArrayRef, CodecError> {
    Ok(match c {
        Column::Bool(v) => Arc::new(BooleanArray::from(v)),
        Column::Int(v) => Arc::new(Int64Array::from(v)),
        Column::Float(v) => Arc::new(Float64Array::from(v)),
        Column::Str(v) => Arc::new(StringArray::from_iter_values(v.iter().map(|s| &**s))),
        Column::Ts(v) => Arc::new(TimestampMillisecondArray::from(v)),
        Column::Any(v) => any_array(&v)?,
    })
}

/// A batch of `schema` as an Arrow record batch: its columns, already as
/// Arrow arrays of their kinds, then [`EVENT_TIME`] (`ts`).
fn record_batch(
    schema: &Schema,
    columns: Vec<(Kind, ArrayRef)>,
    ts: Vec<i64>,
) -> Result<RecordBatch, CodecError> {
    let mut fields = Vec::with_capacity(columns.len() + 1);
    let mut arrays = Vec::with_capacity(columns.len() + 1);
    for (f, (k, a)) in schema.fields.iter().zip(columns) {
        fields.push(ArrowField::new(
            &f.name,
            arrow_type(k),
            k == Kind::EventTime,
        ));
        arrays.push(a);
    }
    fields.push(ArrowField::new(EVENT_TIME, ArrowType::Int64, false));
    arrays.push(Arc::new(Int64Array::from(ts)));
    Ok(RecordBatch::try_new(
        Arc::new(ArrowSchema::new(fields)),
        arrays,
    )?)
}

/// The dictionary of one string column of a channel, on the sending end:
/// every string it has coded, kept across streams (a new stream's first
/// batch carries the whole dictionary again).
#[derive(Default)]
struct Dictionary {
    codes: rustc_hash::FxHashMap<Arc<str>, u16>,
    values: Vec<Arc<str>>,
    /// `values` as the Arrow array the batches carry: the same array while
    /// no string is added, so the writer sends no dictionary message.
    array: Option<ArrayRef>,
    /// Strings copied into dictionary arrays, and rows sent.
    copied: usize,
    rows: usize,
    /// Too many strings, or too dear to keep up: the column goes as utf8.
    plain: bool,
}

impl Dictionary {
    /// `column` as a dictionary array, the dictionary grown by its new
    /// strings; `None` (and the column plain from now on) when the
    /// dictionary would pass its bounds.
    fn encode(&mut self, column: &[Arc<str>]) -> Option<ArrayRef> {
        let before = self.values.len();
        let mut keys = Vec::with_capacity(column.len());
        for s in column {
            let code = match self.codes.get(s) {
                Some(c) => *c,
                None => {
                    let Ok(c) = u16::try_from(self.values.len()) else {
                        self.go_plain();
                        return None;
                    };
                    self.codes.insert(s.clone(), c);
                    self.values.push(s.clone());
                    c
                }
            };
            keys.push(code);
        }
        self.rows += column.len();
        if self.values.len() != before || self.array.is_none() {
            self.copied += self.values.len();
            if self.copied > DICTIONARY_WARMUP + UPKEEP_PER_ROW * self.rows {
                self.go_plain();
                return None;
            }
            self.array = Some(Arc::new(StringArray::from_iter_values(
                self.values.iter().map(|s| &**s),
            )));
        }
        let values = self.array.clone()?;
        let keys = arrow_array::UInt16Array::from(keys);
        // Every code indexes `values`: no check needed, but cheap.
        arrow_array::DictionaryArray::try_new(keys, values)
            .ok()
            .map(|d| Arc::new(d) as ArrayRef)
    }

    fn go_plain(&mut self) {
        *self = Self {
            plain: true,
            ..Self::default()
        };
    }
}

/// The sending end of a channel.
#[derive(Default)]
pub struct BatchEncoder {
    layout: Vec<Kind>,
    writer: Option<StreamWriter<Vec<u8>>>,
    /// One per column (used by `Str` columns).
    dictionaries: Vec<Dictionary>,
}

impl BatchEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The message that carries `batch` (whose vectors become the Arrow
    /// arrays the writer reads, without a copy).
    pub fn encode(&mut self, batch: Batch) -> Result<Message, CodecError> {
        if batch.columns.len() != batch.schema.fields.len() {
            return Err(CodecError(format!(
                "a batch of {} columns for a schema of {} fields",
                batch.columns.len(),
                batch.schema.fields.len()
            )));
        }
        self.dictionaries
            .resize_with(batch.columns.len(), Dictionary::default);
        let Batch {
            schema,
            columns: batch_columns,
            ts,
        } = batch;
        let mut columns = Vec::with_capacity(batch_columns.len());
        for (c, d) in batch_columns.into_iter().zip(self.dictionaries.iter_mut()) {
            let coded = match &c {
                Column::Str(v) if !d.plain => d.encode(v).map(|a| (Kind::Dict, a)),
                Column::Ts(v) if *v == ts => Some((
                    Kind::EventTime,
                    Arc::new(NullArray::new(v.len())) as ArrayRef,
                )),
                _ => None,
            };
            columns.push(match coded {
                Some(a) => a,
                None => (kind(&c), to_arrow(c)?),
            });
        }
        let layout: Vec<Kind> = columns.iter().map(|(k, _)| *k).collect();
        let rb = record_batch(&schema, columns, ts)?;
        let new_stream = self.writer.is_none() || layout != self.layout;
        if new_stream {
            let options =
                IpcWriteOptions::default().with_dictionary_handling(DictionaryHandling::Delta);
            self.writer = Some(StreamWriter::try_new_with_options(
                Vec::new(),
                rb.schema_ref(),
                options,
            )?);
            self.layout = layout;
        }
        let w = self.writer.as_mut().expect("set above");
        w.write(&rb)?;
        // The next message starts with room for one as big as this one:
        // growing the buffer from empty copies it over and over.
        let room = w.get_ref().len();
        Ok(Message {
            new_stream,
            bytes: Bytes::from(std::mem::replace(w.get_mut(), Vec::with_capacity(room))),
        })
    }
}

/// The receiving end of a channel, for batches of `schema`.
pub struct BatchDecoder {
    schema: SchemaRef,
    decoder: StreamDecoder,
    /// Whether a stream has begun (its schema read).
    started: bool,
    max_message: usize,
    strings: Interner,
    /// The strings of each dictionary column of the stream, by code.
    dictionaries: Vec<DictionaryStrings>,
}

/// A stream's dictionary for one column, on the receiving end: one `Arc`
/// per string, by code, read once per dictionary message.
#[derive(Default)]
struct DictionaryStrings {
    /// The dictionary array they were read from (the decoder hands every
    /// batch the same buffers until the next dictionary message; holding
    /// them keeps their address from being reused).
    read_from: Option<StringArray>,
    strings: Vec<Arc<str>>,
}

/// Whether two string arrays are the same buffers.
fn same_array(a: &StringArray, b: &StringArray) -> bool {
    a.len() == b.len()
        && a.offsets().inner().inner().as_ptr() == b.offsets().inner().inner().as_ptr()
        && a.values().as_ptr() == b.values().as_ptr()
}

impl DictionaryStrings {
    /// The strings of `values`, the dictionary of a batch.
    fn update(&mut self, values: &StringArray, strings: &mut Interner) -> Result<(), CodecError> {
        if self
            .read_from
            .as_ref()
            .is_some_and(|r| same_array(r, values))
        {
            return Ok(());
        }
        if values.len() > MAX_DICTIONARY {
            return Err(CodecError(format!(
                "a dictionary of {} strings (at most {MAX_DICTIONARY})",
                values.len()
            )));
        }
        if values.null_count() > 0 {
            return Err(CodecError("a null in a dictionary".into()));
        }
        // A delta keeps what came before; anything else starts over.
        let kept = self.strings.len() <= values.len()
            && self
                .strings
                .iter()
                .enumerate()
                .all(|(i, s)| **s == *values.value(i));
        if !kept {
            self.strings.clear();
        }
        for i in self.strings.len()..values.len() {
            self.strings.push(strings.get(values.value(i)));
        }
        self.read_from = Some(values.clone());
        Ok(())
    }
}

/// The strings a decoder has seen, shared by every row that repeats one
/// (keys repeat): one allocation per distinct string instead of one per
/// row, and equal keys are one `Arc`, which compares by pointer. Bounded:
/// past [`Interner::MAX_STRINGS`] strings or [`Interner::MAX_BYTES`] bytes
/// it keeps what it has and allocates the rest per row.
#[derive(Default)]
struct Interner {
    set: rustc_hash::FxHashSet<Arc<str>>,
    bytes: usize,
}

impl Interner {
    const MAX_STRINGS: usize = 1 << 16;
    const MAX_BYTES: usize = 8 << 20;
    /// Longer strings are payloads, not keys: not kept.
    const MAX_LEN: usize = 256;

    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        if s.len() <= Self::MAX_LEN
            && self.set.len() < Self::MAX_STRINGS
            && self.bytes + s.len() <= Self::MAX_BYTES
        {
            self.bytes += s.len();
            self.set.insert(a.clone());
        }
        a
    }
}

impl BatchDecoder {
    /// A decoder of batches whose fields are `schema`'s, taking messages of
    /// at most `max_message` bytes.
    pub fn new(schema: SchemaRef, max_message: usize) -> Self {
        Self {
            schema,
            decoder: StreamDecoder::new(),
            started: false,
            max_message,
            strings: Interner::default(),
            dictionaries: Vec::new(),
        }
    }

    /// The batch `msg` carries.
    pub fn decode(&mut self, msg: &Message) -> Result<Batch, CodecError> {
        if msg.bytes.len() > self.max_message {
            return Err(CodecError(format!(
                "a message of {} bytes is over the bound of {}",
                msg.bytes.len(),
                self.max_message
            )));
        }
        if msg.new_stream {
            self.decoder = StreamDecoder::new();
            self.dictionaries.clear();
            self.started = true;
        } else if !self.started {
            return Err(CodecError("a batch before its stream's schema".to_string()));
        }
        // arrow-ipc trusts the buffer offsets a message declares and
        // panics on some that lie: contain that as this message's error,
        // and take nothing more from the stream (its state is unknown).
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.record_batch(&msg.bytes)
        }));
        let rb = match decoded {
            Ok(r) => r?,
            Err(_) => {
                self.decoder = StreamDecoder::new();
                self.started = false;
                return Err(CodecError(
                    "a malformed message (its buffers lie outside its body)".into(),
                ));
            }
        };
        let (schema, strings, dictionaries) =
            (&self.schema, &mut self.strings, &mut self.dictionaries);
        dictionaries.resize_with(schema.fields.len(), DictionaryStrings::default);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batch(schema, strings, dictionaries, &rb)
        }))
        .unwrap_or_else(|_| {
            Err(CodecError(
                "a malformed message (its arrays are inconsistent)".into(),
            ))
        })
    }

    /// The one record batch in `bytes`.
    fn record_batch(&mut self, bytes: &[u8]) -> Result<RecordBatch, CodecError> {
        // One copy, into an aligned buffer, rather than handing Arrow the
        // received bytes themselves: they sit at whatever offset the frame
        // put them, so Arrow would copy every misaligned buffer anyway, and
        // arrays it kept (a stream's dictionaries) would pin the whole
        // receive buffer they were sliced from.
        let mut buf = Buffer::from(bytes);
        let mut got = None;
        while !buf.is_empty() {
            let before = buf.len();
            if let Some(rb) = self.decoder.decode(&mut buf)? {
                if got.is_some() {
                    return Err(CodecError("a message with more than one batch".into()));
                }
                got = Some(rb);
            }
            if buf.len() == before {
                return Err(CodecError("a message the decoder cannot advance in".into()));
            }
        }
        got.ok_or_else(|| CodecError("a message without a whole batch".into()))
    }
}

/// The batch of `schema` that `rb` holds.
fn batch(
    schema: &SchemaRef,
    strings: &mut Interner,
    dictionaries: &mut [DictionaryStrings],
    rb: &RecordBatch,
) -> Result<Batch, CodecError> {
    let fields = &schema.fields;
    let arrow = rb.schema();
    let names: Vec<&str> = arrow.fields().iter().map(|f| f.name().as_str()).collect();
    let want: Vec<&str> = fields
        .iter()
        .map(|f| f.name.as_str())
        .chain([EVENT_TIME])
        .collect();
    if names != want {
        return Err(CodecError(format!(
            "the stream's fields {names:?} are not the plan's {want:?}: the two TaskManagers run different plans of the job"
        )));
    }
    let ts = rb.columns()[fields.len()]
        .as_primitive_opt::<Int64Type>()
        .filter(|a| a.null_count() == 0)
        .ok_or_else(|| CodecError(format!("{EVENT_TIME} is not a non-null int64 column")))?
        .values();
    let mut columns = Vec::with_capacity(fields.len());
    for ((i, a), d) in rb.columns()[..fields.len()]
        .iter()
        .enumerate()
        .zip(dictionaries.iter_mut())
    {
        columns.push(
            from_arrow(a, ts, strings, d)
                .map_err(|e| CodecError(format!("column {:?}: {}", names[i], e.0)))?,
        );
    }
    Ok(Batch {
        schema: schema.clone(),
        columns,
        ts: ts.to_vec(),
    })
}

/// The column `a` carries; `ts` are the batch's event times (what a null
/// column stands for).
fn from_arrow(
    a: &ArrayRef,
    ts: &[i64],
    strings: &mut Interner,
    dictionary: &mut DictionaryStrings,
) -> Result<Column, CodecError> {
    let nulls = || CodecError("a null outside a union".into());
    if a.null_count() > 0 && !matches!(a.data_type(), ArrowType::Union(..) | ArrowType::Null) {
        return Err(nulls());
    }
    Ok(match a.data_type() {
        ArrowType::Boolean => {
            Column::Bool(a.as_boolean().iter().map(|b| b.unwrap_or(false)).collect())
        }
        ArrowType::Int64 => Column::Int(a.as_primitive::<Int64Type>().values().to_vec()),
        // A timestamp column equal to the event times (Kind::EventTime).
        ArrowType::Null => Column::Ts(ts.to_vec()),
        ArrowType::Float64 => Column::Float(a.as_primitive::<Float64Type>().values().to_vec()),
        ArrowType::Utf8 => Column::Str(
            a.as_string::<i32>()
                .iter()
                .map(|s| strings.get(s.unwrap_or("")))
                .collect(),
        ),
        ArrowType::Timestamp(TimeUnit::Millisecond, None) => Column::Ts(
            a.as_primitive::<TimestampMillisecondType>()
                .values()
                .to_vec(),
        ),
        ArrowType::Union(fields, UnionMode::Dense) if *fields == union_fields() => {
            Column::Any(union_values(a.as_union(), strings)?)
        }
        t if *t == dictionary_type() => {
            let d = a.as_dictionary::<UInt16Type>();
            let values = d
                .values()
                .as_string_opt::<i32>()
                .ok_or_else(|| CodecError("a dictionary whose values are not utf8".into()))?;
            dictionary.update(values, strings)?;
            let all = &dictionary.strings;
            Column::Str(
                d.keys()
                    .values()
                    .iter()
                    .map(|k| {
                        all.get(usize::from(*k)).cloned().ok_or_else(|| {
                            CodecError(format!(
                                "a code {k} outside its dictionary of {}",
                                all.len()
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        other => {
            return Err(CodecError(format!(
                "a column of Arrow type {other}, which Ferry does not send"
            )));
        }
    })
}

fn union_values(u: &UnionArray, strings: &mut Interner) -> Result<Vec<Value>, CodecError> {
    let bad = || CodecError("a union value outside its child".into());
    let child = |id: i8| u.child(id);
    let mut out = Vec::with_capacity(u.len());
    for i in 0..u.len() {
        let id = u.type_id(i);
        let at = u.value_offset(i);
        let c = child(id);
        if at >= c.len() || c.is_null(at) && id != 0 {
            return Err(bad());
        }
        out.push(match id {
            0 => Value::Null,
            1 => Value::Bool(c.as_boolean().value(at)),
            2 => Value::Int(c.as_primitive::<Int64Type>().value(at)),
            3 => Value::Float(c.as_primitive::<Float64Type>().value(at)),
            4 => Value::Str(strings.get(c.as_string::<i32>().value(at))),
            5 => Value::Ts(c.as_primitive::<TimestampMillisecondType>().value(at)),
            _ => return Err(bad()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use ferry_core::schema::Schema;
    use ferry_core::value::DataType;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new([
            ("user".to_string(), DataType::String),
            ("n".to_string(), DataType::Int),
            ("x".to_string(), DataType::Any),
        ]))
    }

    fn batch(rows: usize, mixed: bool) -> Batch {
        let any: Vec<Value> = (0..rows)
            .map(|i| match (mixed, i % 6) {
                (false, _) => Value::Float(i as f64 / 3.0),
                (true, 0) => Value::Null,
                (true, 1) => Value::Bool(i % 4 == 1),
                (true, 2) => Value::Int(-(i as i64)),
                (true, 3) => Value::Float(f64::MAX),
                (true, 4) => Value::Str(Arc::from(format!("é-{i}"))),
                (true, _) => Value::Ts(1_700_000_000_000 + i as i64),
            })
            .collect();
        Batch {
            schema: schema(),
            columns: vec![
                Column::Str(
                    (0..rows)
                        .map(|i| Arc::from(format!("u{}", i % 7)))
                        .collect(),
                ),
                Column::Int((0..rows as i64).map(|i| i * 1_000_003).collect()),
                Column::from_values(any),
            ],
            ts: (0..rows as i64).map(|i| 1_000 + i * 10).collect(),
        }
    }

    fn same(a: &Batch, b: &Batch) {
        assert_eq!(a.ts, b.ts);
        assert_eq!(a.columns, b.columns);
        assert_eq!(a.schema, b.schema);
    }

    #[test]
    fn a_field_equal_to_the_event_time_crosses_once() {
        let schema = Arc::new(Schema::new([
            ("k".to_string(), DataType::Int),
            ("ts".to_string(), DataType::Timestamp),
        ]));
        let rows = 1000i64;
        let ts: Vec<i64> = (0..rows).map(|i| 1_700_000_000_000 + i * 7).collect();
        let with = |field: Vec<i64>| Batch {
            schema: schema.clone(),
            columns: vec![Column::Int((0..rows).collect()), Column::Ts(field)],
            ts: ts.clone(),
        };
        let same = with(ts.clone());
        let mut other_ts = ts.clone();
        other_ts[rows as usize - 1] += 1;
        let other = with(other_ts);
        let mut enc = BatchEncoder::new();
        let mut dec = BatchDecoder::new(schema.clone(), DEFAULT_MAX_MESSAGE);
        // Sent twice each, so the second message of each layout carries
        // no schema and the sizes compare the batches alone.
        let mut sizes = Vec::new();
        for b in [&same, &same, &other, &other] {
            let m = enc.encode(b.clone()).unwrap();
            let got = dec.decode(&m).unwrap();
            assert_eq!(got.columns, b.columns);
            assert_eq!(got.ts, b.ts);
            sizes.push(m.bytes.len());
        }
        assert!(
            sizes[1] + 8 * rows as usize <= sizes[3],
            "a field equal to the event time saves its eight bytes a row: {sizes:?}"
        );
    }

    #[test]
    fn batches_cross_the_wire_unchanged_and_the_schema_goes_once_per_layout() {
        let mut enc = BatchEncoder::new();
        let mut dec = BatchDecoder::new(schema(), DEFAULT_MAX_MESSAGE);
        let first = batch(100, false);
        let m1 = enc.encode(first.clone()).unwrap();
        assert!(m1.new_stream);
        same(&dec.decode(&m1).unwrap(), &first);
        // Same layout: no schema again, and smaller.
        let m2 = enc.encode(batch(100, false)).unwrap();
        assert!(!m2.new_stream && m2.bytes.len() < m1.bytes.len());
        same(&dec.decode(&m2).unwrap(), &batch(100, false));
        // A column turned Any: a new stream, every value kind kept.
        let mixed = batch(60, true);
        assert!(matches!(mixed.columns[2], Column::Any(_)));
        let m3 = enc.encode(mixed.clone()).unwrap();
        assert!(m3.new_stream);
        same(&dec.decode(&m3).unwrap(), &mixed);
        // An empty batch too.
        let empty = batch(0, false);
        same(
            &dec.decode(&enc.encode(empty.clone()).unwrap()).unwrap(),
            &empty,
        );
    }

    /// A batch of one string column `user` with these values.
    fn users(values: impl IntoIterator<Item = String>) -> Batch {
        let users: Vec<Arc<str>> = values.into_iter().map(Arc::from).collect();
        let n = users.len() as i64;
        Batch {
            schema: Arc::new(Schema::new([("user".to_string(), DataType::String)])),
            columns: vec![Column::Str(users)],
            ts: (0..n).collect(),
        }
    }

    #[test]
    fn repeated_strings_cross_once_then_as_two_byte_codes() {
        let mut enc = BatchEncoder::new();
        let mut dec = BatchDecoder::new(users([]).schema, DEFAULT_MAX_MESSAGE);
        let keys =
            |from: usize, n: usize| users((0..1000).map(move |i| format!("key-{}", from + i % n)));
        let first = keys(0, 100);
        let m1 = enc.encode(first.clone()).unwrap();
        let d1 = dec.decode(&m1).unwrap();
        same(&d1, &first);
        // The same 100 keys again: no dictionary, two bytes a row plus the
        // event time's eight (and the message's framing).
        let again = keys(0, 100);
        let m2 = enc.encode(again.clone()).unwrap();
        assert!(!m2.new_stream);
        assert!(
            m2.bytes.len() < 1000 * 10 + 1024,
            "{} bytes",
            m2.bytes.len()
        );
        let d2 = dec.decode(&m2).unwrap();
        same(&d2, &again);
        // Equal strings are one `Arc` on the receiving end, batch after batch.
        let (Column::Str(a), Column::Str(b)) = (&d1.columns[0], &d2.columns[0]) else {
            panic!("string columns")
        };
        assert!(Arc::ptr_eq(&a[0], &b[0]) && Arc::ptr_eq(&a[0], &a[100]));
        // Fifty new keys: a delta, decoded with the old ones.
        let more = keys(50, 100);
        let m3 = enc.encode(more.clone()).unwrap();
        assert!(!m3.new_stream);
        same(&dec.decode(&m3).unwrap(), &more);
        // Compared with the same rows as plain utf8 (six bytes and a
        // four-byte offset a row), each row saves at least seven bytes.
        let mut plain = BatchEncoder::new();
        plain.dictionaries = vec![Dictionary {
            plain: true,
            ..Dictionary::default()
        }];
        let p = plain.encode(again.clone()).unwrap();
        assert!(
            m2.bytes.len() + 1000 * 7 <= p.bytes.len(),
            "{} vs {}",
            m2.bytes.len(),
            p.bytes.len()
        );
        let mut dec = BatchDecoder::new(again.schema.clone(), DEFAULT_MAX_MESSAGE);
        same(&dec.decode(&p).unwrap(), &again);
    }

    #[test]
    fn strings_that_do_not_repeat_go_plain_and_still_arrive() {
        let mut enc = BatchEncoder::new();
        let mut dec = BatchDecoder::new(users([]).schema, DEFAULT_MAX_MESSAGE);
        let mut new_streams = 0;
        let mut last = 0;
        // 2,000 new strings a batch: past the warm-up the upkeep of a
        // dictionary that only grows is too dear.
        for b in 0..100 {
            let batch = users((0..2000).map(|i| format!("id-{b}-{i}")));
            let m = enc.encode(batch.clone()).unwrap();
            new_streams += usize::from(m.new_stream);
            same(&dec.decode(&m).unwrap(), &batch);
            last = m.bytes.len();
        }
        assert!(
            enc.dictionaries[0].plain,
            "the column should have gone plain"
        );
        assert_eq!(new_streams, 2, "one stream as a dictionary, one plain");
        assert!(last > 2000 * 10, "plain strings: {last} bytes");
        // More distinct strings than 16-bit codes reach, in one batch.
        let mut enc = BatchEncoder::new();
        let big = users((0..MAX_DICTIONARY + 10).map(|i| format!("{i}")));
        let m = enc.encode(big.clone()).unwrap();
        assert!(enc.dictionaries[0].plain);
        let mut dec = BatchDecoder::new(big.schema.clone(), DEFAULT_MAX_MESSAGE);
        same(&dec.decode(&m).unwrap(), &big);
    }

    #[test]
    fn a_dictionary_past_the_bound_is_refused() {
        use arrow_array::{DictionaryArray, UInt16Array};
        let schema = users([]).schema;
        let message = |values: Vec<String>, codes: Vec<u16>| {
            let n = codes.len() as i64;
            let dict = DictionaryArray::new(
                UInt16Array::from(codes),
                Arc::new(StringArray::from(values)),
            );
            let rb = RecordBatch::try_new(
                Arc::new(ArrowSchema::new(vec![
                    ArrowField::new("user", dictionary_type(), false),
                    ArrowField::new(EVENT_TIME, ArrowType::Int64, false),
                ])),
                vec![
                    Arc::new(dict),
                    Arc::new(Int64Array::from((0..n).collect::<Vec<_>>())),
                ],
            )
            .unwrap();
            let mut w = StreamWriter::try_new(Vec::new(), rb.schema_ref()).unwrap();
            w.write(&rb).unwrap();
            Message {
                new_stream: true,
                bytes: w.into_inner().unwrap().into(),
            }
        };
        let ok = message(vec!["a".into(), "b".into()], vec![1, 0, 1]);
        let got = BatchDecoder::new(schema.clone(), DEFAULT_MAX_MESSAGE)
            .decode(&ok)
            .unwrap();
        same(&got, &users(["b", "a", "b"].map(String::from)));
        let huge = message(
            (0..MAX_DICTIONARY + 1).map(|i| i.to_string()).collect(),
            vec![0],
        );
        let e = BatchDecoder::new(schema.clone(), DEFAULT_MAX_MESSAGE)
            .decode(&huge)
            .unwrap_err();
        assert!(e.0.contains("a dictionary of"), "{e}");
    }

    #[test]
    fn what_the_plan_does_not_expect_is_refused_with_a_reason() {
        let mut enc = BatchEncoder::new();
        let m = enc.encode(batch(10, false)).unwrap();
        let other = Arc::new(Schema::new([
            ("user".to_string(), DataType::String),
            ("m".to_string(), DataType::Int),
            ("x".to_string(), DataType::Any),
        ]));
        let e = BatchDecoder::new(other, DEFAULT_MAX_MESSAGE)
            .decode(&m)
            .unwrap_err();
        assert!(e.0.contains("different plans"), "{e}");
        let e = BatchDecoder::new(schema(), 16).decode(&m).unwrap_err();
        assert!(e.0.contains("over the bound"), "{e}");
        let mut dec = BatchDecoder::new(schema(), DEFAULT_MAX_MESSAGE);
        let later = enc.encode(batch(10, false)).unwrap();
        let e = dec.decode(&later).unwrap_err();
        assert!(e.0.contains("before its stream's schema"), "{e}");
        // Two batches in one message.
        let mut two = m.clone();
        two.bytes = [&m.bytes[..], &later.bytes[..]].concat().into();
        let e = BatchDecoder::new(schema(), DEFAULT_MAX_MESSAGE)
            .decode(&two)
            .unwrap_err();
        assert!(e.0.contains("more than one batch"), "{e}");
        // A truncated message.
        let mut cut = m.clone();
        cut.bytes.truncate(m.bytes.len() / 2);
        assert!(
            BatchDecoder::new(schema(), DEFAULT_MAX_MESSAGE)
                .decode(&cut)
                .is_err()
        );
    }

    #[test]
    fn corrupted_messages_are_errors_never_panics() {
        let mut enc = BatchEncoder::new();
        let msgs = [
            enc.encode(batch(40, true)).unwrap(),
            enc.encode(batch(40, true)).unwrap(),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let mut refused = 0;
        for _ in 0..3000 {
            let mut m = msgs[rng.random_range(0..2)].clone();
            m.new_stream = true;
            let mut bytes = m.bytes.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            m.bytes = bytes.into();
            let mut dec = BatchDecoder::new(schema(), DEFAULT_MAX_MESSAGE);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dec.decode(&m)));
            match r {
                Ok(Ok(b)) => assert_eq!(b.columns.len(), 3),
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("decoding a corrupted message panicked: {:?}", m.bytes),
            }
        }
        assert!(refused > 0, "no corruption was noticed");
    }
}

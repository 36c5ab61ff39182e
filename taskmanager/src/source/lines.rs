//! Turning one line of JSON-lines or CSV text into a record's values, or
//! into the reason it is a bad line.
//!
//! Invariant: a line is judged on its own — its values against the declared
//! types, its CSV columns against the header or the schema — so a bad line
//! never changes how the lines after it are read.

use ferry_core::schema::SchemaRef;
use ferry_core::spec::FileFormat;
use ferry_core::value::{DataType, Value, parse_ts};

/// What one non-empty line is.
pub(super) enum Line {
    /// A CSV header, now recorded in the file's state.
    Header,
    /// A record's values and event time (`None`: no event-time field).
    Record(Vec<Value>, Option<i64>),
}

/// How lines become records: the format settings of a file source.
pub(super) struct LineParser {
    pub format: FileFormat,
    /// CSV: the first line of each file names the columns.
    pub header: bool,
    pub schema: SchemaRef,
    /// Index of the event-time field in the schema.
    pub ts_idx: Option<usize>,
    csv: CsvSplitter,
}

impl LineParser {
    pub fn new(
        format: FileFormat,
        header: bool,
        delimiter: u8,
        schema: SchemaRef,
        ts_idx: Option<usize>,
    ) -> Self {
        Self {
            format,
            header,
            schema,
            ts_idx,
            csv: CsvSplitter::new(delimiter),
        }
    }

    /// Parses one non-empty line (without its line break). `header` is the
    /// file's CSV header, set here when this is the header line. `Err` is
    /// the reason the line is bad.
    pub fn parse(&mut self, line: &str, header: &mut Option<Vec<String>>) -> Result<Line, String> {
        let values = match self.format {
            FileFormat::Jsonl => self.json_values(line)?,
            FileFormat::Csv => {
                let n = self.csv.split(line.as_bytes());
                if self.header && header.is_none() {
                    let names = (0..n)
                        .map(|i| self.csv.text(i).map(|s| s.trim().to_string()))
                        .collect::<Result<_, _>>()?;
                    *header = Some(names);
                    return Ok(Line::Header);
                }
                self.csv_values(n, header.as_deref())?
            }
        };
        let t = match self.ts_idx {
            Some(i) => match &values[i] {
                Value::Ts(t) | Value::Int(t) => Some(*t),
                _ => {
                    return Err(format!(
                        "event-time field '{}' is missing or null",
                        self.schema.fields[i].name
                    ));
                }
            },
            None => None,
        };
        Ok(Line::Record(values, t))
    }

    fn json_values(&self, line: &str) -> Result<Vec<Value>, String> {
        let obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| {
                // serde_json ends its message with the position in this one
                // line; say the column once, without the (always 1) line.
                let pos = format!(" at line {} column {}", e.line(), e.column());
                let msg = e.to_string();
                let msg = msg.strip_suffix(&pos).unwrap_or(&msg);
                format!("invalid JSON object at column {}: {msg}", e.column())
            })?;
        self.schema
            .fields
            .iter()
            .map(|fd| {
                convert_json(obj.get(&fd.name), fd.data_type)
                    .map_err(|found| type_error(&fd.name, fd.data_type, &found))
            })
            .collect()
    }

    /// Values of the CSV record with `n` fields now in the splitter.
    fn csv_values(&self, n: usize, header: Option<&[String]>) -> Result<Vec<Value>, String> {
        let fields = &self.schema.fields;
        let (expected, of) = match header {
            Some(h) => (h.len(), "as in the header"),
            None => (fields.len(), "one per schema field"),
        };
        if n != expected {
            return Err(format!("expected {expected} columns ({of}), found {n}"));
        }
        fields
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let col = match header {
                    Some(h) => h.iter().position(|c| c == &fd.name),
                    None => Some(i),
                };
                let cell = col.map(|c| self.csv.text(c)).transpose()?;
                convert_text(cell, fd.data_type).map_err(|()| {
                    let shown = serde_json::Value::from(cell.unwrap_or_default());
                    type_error(&fd.name, fd.data_type, &shown.to_string())
                })
            })
            .collect()
    }

    /// A CSV header must name every schema field.
    pub fn check_header(&self, header: &[String]) -> Result<(), String> {
        let missing: Vec<String> = self
            .schema
            .fields
            .iter()
            .filter(|f| !header.contains(&f.name))
            .map(|f| format!("'{}'", f.name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the CSV header has no column {} (its columns: {}); fix spec.source.file.schema, or set header: false to take columns in schema order",
            missing.join(", "),
            header.join(", ")
        ))
    }
}

/// Splits one CSV line into unquoted fields, reusing its parser and buffers
/// from line to line (a new `csv::Reader` per line cost more than the rest
/// of the parse).
struct CsvSplitter {
    /// Boxed: its transition tables are large.
    reader: Box<csv_core::Reader>,
    out: Vec<u8>,
    ends: Vec<usize>,
    fields: usize,
}

impl CsvSplitter {
    fn new(delimiter: u8) -> Self {
        Self {
            reader: Box::new(csv_core::ReaderBuilder::new().delimiter(delimiter).build()),
            out: vec![0; 256],
            ends: vec![0; 16],
            fields: 0,
        }
    }

    /// Splits `line` (one line, no line break); returns its field count.
    fn split(&mut self, line: &[u8]) -> usize {
        use csv_core::ReadRecordResult as R;
        self.reader.reset();
        let (mut input, mut outlen, mut endlen) = (line, 0, 0);
        loop {
            let (res, nin, nout, nend) =
                self.reader
                    .read_record(input, &mut self.out[outlen..], &mut self.ends[endlen..]);
            input = &input[nin..];
            outlen += nout;
            endlen += nend;
            match res {
                // An empty input next tells the parser the record ended.
                R::InputEmpty => {}
                R::OutputFull => self.out.resize(self.out.len() * 2, 0),
                R::OutputEndsFull => self.ends.resize(self.ends.len() * 2, 0),
                R::Record | R::End => break,
            }
        }
        self.fields = endlen;
        endlen
    }

    /// Field `i` of the last split line, as text.
    fn text(&self, i: usize) -> Result<&str, String> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        std::str::from_utf8(&self.out[start..self.ends[i]])
            .map_err(|e| format!("column {} is not UTF-8 text: {e}", i + 1))
    }
}

fn type_error(field: &str, ty: DataType, found: &str) -> String {
    format!("field '{field}': expected {ty}, found {found}")
}

/// A JSON value as a field of type `ty`. Missing fields and `null` are
/// `Null`; `Err` carries the JSON text of a value that does not fit.
pub(crate) fn convert_json(v: Option<&serde_json::Value>, ty: DataType) -> Result<Value, String> {
    use serde_json::Value as J;
    let Some(v) = v else { return Ok(Value::Null) };
    let converted = match (ty, v) {
        (_, J::Null) => Some(Value::Null),
        (DataType::String, J::String(s)) => Some(Value::Str(s.as_str().into())),
        (DataType::String, other) => Some(Value::Str(other.to_string().into())),
        (DataType::Int, J::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e18)
                    .map(|f| f as i64)
            })
            .map(Value::Int),
        (DataType::Float, J::Number(n)) => n.as_f64().map(Value::Float),
        (DataType::Bool, J::Bool(b)) => Some(Value::Bool(*b)),
        (DataType::Timestamp, J::Number(n)) => n.as_i64().map(Value::Ts),
        (DataType::Int | DataType::Float | DataType::Bool | DataType::Timestamp, J::String(s)) => {
            convert_text(Some(s), ty).ok()
        }
        (DataType::Any, J::Bool(b)) => Some(Value::Bool(*b)),
        (DataType::Any, J::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float)),
        (DataType::Any, J::String(s)) => Some(Value::Str(s.as_str().into())),
        (DataType::Any, other) => Some(Value::Str(other.to_string().into())),
        _ => None,
    };
    converted.ok_or_else(|| v.to_string())
}

/// A CSV cell (or JSON string) as a field of type `ty`. Missing and empty
/// cells are `Null`; `Err` means the text does not fit the type.
fn convert_text(s: Option<&str>, ty: DataType) -> Result<Value, ()> {
    let Some(s) = s.map(str::trim) else {
        return Ok(Value::Null);
    };
    if s.is_empty() {
        return Ok(Value::Null);
    }
    match ty {
        DataType::String | DataType::Any => Ok(Value::Str(s.into())),
        DataType::Int => s.parse().map(Value::Int).map_err(drop),
        DataType::Float => s.parse().map(Value::Float).map_err(drop),
        DataType::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            _ => Err(()),
        },
        DataType::Timestamp => parse_ts(s).map(Value::Ts).ok_or(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_core::schema::Schema;

    use super::*;

    #[test]
    fn values_that_do_not_fit_their_type_are_errors_and_absent_ones_null() {
        use serde_json::json;
        assert!(matches!(convert_json(None, DataType::Int), Ok(Value::Null)));
        assert!(matches!(
            convert_json(Some(&json!(null)), DataType::Int),
            Ok(Value::Null)
        ));
        assert!(matches!(
            convert_json(Some(&json!(3.0)), DataType::Int),
            Ok(Value::Int(3))
        ));
        assert!(matches!(
            convert_json(Some(&json!("12")), DataType::Int),
            Ok(Value::Int(12))
        ));
        assert_eq!(
            convert_json(Some(&json!("x")), DataType::Int).unwrap_err(),
            "\"x\""
        );
        assert!(convert_json(Some(&json!({"a": 1})), DataType::Float).is_err());
        assert!(convert_json(Some(&json!(1)), DataType::Bool).is_err());
        assert!(matches!(
            convert_json(Some(&json!([1])), DataType::String),
            Ok(Value::Str(s)) if &*s == "[1]"
        ));
        assert!(matches!(
            convert_text(Some(" "), DataType::Float),
            Ok(Value::Null)
        ));
        assert!(convert_text(Some("1e"), DataType::Float).is_err());
        assert!(convert_text(Some("maybe"), DataType::Bool).is_err());
    }

    #[test]
    fn csv_lines_split_with_quotes_and_a_reused_parser() {
        let schema = Arc::new(Schema::new([
            ("a".to_string(), DataType::String),
            ("b".to_string(), DataType::Int),
        ]));
        let mut p = LineParser::new(FileFormat::Csv, false, b';', schema, None);
        let mut header = None;
        let long = "x".repeat(1000);
        for (line, want) in [
            ("plain;1", Ok(("plain", 1))),
            ("\"semi;colon \"\"q\"\"\";2", Ok(("semi;colon \"q\"", 2))),
            (&format!("{long};3") as &str, Ok((long.as_str(), 3))),
            (
                "one",
                Err("expected 2 columns (one per schema field), found 1"),
            ),
            (
                "a;b;c",
                Err("expected 2 columns (one per schema field), found 3"),
            ),
            ("a;b", Err("field 'b': expected int, found \"b\"")),
        ] {
            match (p.parse(line, &mut header), want) {
                (Ok(Line::Record(v, None)), Ok((a, b))) => {
                    assert!(matches!(&v[0], Value::Str(s) if &**s == a), "{line}: {v:?}");
                    assert!(matches!(v[1], Value::Int(n) if n == b), "{line}: {v:?}");
                }
                (Err(e), Err(want)) => assert_eq!(e, want, "{line}"),
                (got, _) => panic!(
                    "{line}: unexpected {}",
                    match got {
                        Ok(_) => "record or header".to_string(),
                        Err(e) => e,
                    }
                ),
            }
        }
    }
}

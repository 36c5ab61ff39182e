//! Scalar values and their types, as records carry them between operators and
//! into state and sinks.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The type of a record field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    Int,
    Float,
    String,
    /// Milliseconds since the Unix epoch, rendered as RFC 3339 in output.
    Timestamp,
    /// Known only at run time (results of general expressions, JSON input).
    Any,
}

impl DataType {
    pub fn is_numeric(self) -> bool {
        matches!(self, DataType::Int | DataType::Float | DataType::Any)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DataType::Bool => "bool",
            DataType::Int => "int",
            DataType::Float => "float",
            DataType::String => "string",
            DataType::Timestamp => "timestamp",
            DataType::Any => "any",
        };
        f.write_str(s)
    }
}

/// One field value. Floats compare and hash by bit pattern so that values can
/// be keys; `Null` equals `Null`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Arc<str>),
    /// Event-time style timestamp: milliseconds since the Unix epoch.
    Ts(i64),
}

impl Value {
    pub fn data_type(&self) -> DataType {
        match self {
            Value::Null => DataType::Any,
            Value::Bool(_) => DataType::Bool,
            Value::Int(_) => DataType::Int,
            Value::Float(_) => DataType::Float,
            Value::Str(_) => DataType::String,
            Value::Ts(_) => DataType::Timestamp,
        }
    }

    /// Numeric view used by aggregations; `None` for non-numbers.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Ts(t) => Some(*t as f64),
            _ => None,
        }
    }

    /// Appends this value as JSON to `out` (timestamps as RFC 3339 strings).
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) if f.is_finite() => {
                let _ = write!(out, "{f}");
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    out.push_str(".0");
                }
            }
            Value::Float(_) => out.push_str("null"),
            Value::Str(s) => write_json_str(s, out),
            Value::Ts(ms) => {
                out.push('"');
                out.push_str(&format_ts(*ms));
                out.push('"');
            }
        }
    }

    /// The value as `serde_json::Value` (timestamps as RFC 3339 strings).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
            Value::Ts(ms) => serde_json::Value::String(format_ts(*ms)),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Ts(a), Value::Ts(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Bool(b) => {
                state.write_u8(1);
                b.hash(state)
            }
            Value::Int(i) => {
                state.write_u8(2);
                i.hash(state)
            }
            Value::Float(f) => {
                state.write_u8(3);
                f.to_bits().hash(state)
            }
            Value::Str(s) => {
                state.write_u8(4);
                s.hash(state)
            }
            Value::Ts(t) => {
                state.write_u8(5);
                t.hash(state)
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
            Value::Ts(ms) => f.write_str(&format_ts(*ms)),
        }
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ts(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None if ms == i64::MAX => "+end-of-time".to_string(),
        None if ms == i64::MIN => "-start-of-time".to_string(),
        None => ms.to_string(),
    }
}

/// Parses an RFC 3339 timestamp or a plain integer of epoch milliseconds.
pub fn parse_ts(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rendering_matches_serde_json() {
        let vals = [
            Value::Null,
            Value::Bool(true),
            Value::Int(-42),
            Value::Float(1.5),
            Value::Float(3.0),
            Value::Str("a\"b\\c\n\u{1}".into()),
            Value::Ts(1_767_225_600_000),
        ];
        for v in vals {
            let mut s = String::new();
            v.write_json(&mut s);
            let parsed: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(parsed, v.to_json(), "{s}");
        }
    }

    #[test]
    fn timestamps_round_trip() {
        let ms = 1_767_225_612_345;
        assert_eq!(format_ts(ms), "2026-01-01T00:00:12.345Z");
        assert_eq!(parse_ts(&format_ts(ms)), Some(ms));
        assert_eq!(parse_ts("1767225612345"), Some(ms));
        assert_eq!(parse_ts("yesterday"), None);
    }
}

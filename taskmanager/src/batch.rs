//! Columnar record batches: the unit records move in between operators.
//!
//! Invariant: every column and the event-time vector have the same length.

use std::sync::Arc;

use ferry_core::schema::SchemaRef;
use ferry_core::value::Value;

/// One column of a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Column {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Float(Vec<f64>),
    Str(Vec<Arc<str>>),
    /// Epoch milliseconds.
    Ts(Vec<i64>),
    /// Mixed or nullable values.
    Any(Vec<Value>),
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Bool(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Str(v) => v.len(),
            Column::Ts(v) => v.len(),
            Column::Any(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value at row `i`.
    pub fn get(&self, i: usize) -> Value {
        match self {
            Column::Bool(v) => Value::Bool(v[i]),
            Column::Int(v) => Value::Int(v[i]),
            Column::Float(v) => Value::Float(v[i]),
            Column::Str(v) => Value::Str(v[i].clone()),
            Column::Ts(v) => Value::Ts(v[i]),
            Column::Any(v) => v[i].clone(),
        }
    }

    /// Numeric view of row `i` (`None` for non-numbers and nulls).
    #[inline]
    pub fn f64_at(&self, i: usize) -> Option<f64> {
        match self {
            Column::Int(v) | Column::Ts(v) => Some(v[i] as f64),
            Column::Float(v) => Some(v[i]),
            Column::Any(v) => v[i].as_f64(),
            _ => None,
        }
    }

    /// Keeps the rows whose `keep` flag is set.
    pub fn filter(&self, keep: &[bool]) -> Column {
        fn f<T: Clone>(v: &[T], keep: &[bool]) -> Vec<T> {
            v.iter()
                .zip(keep)
                .filter(|(_, k)| **k)
                .map(|(x, _)| x.clone())
                .collect()
        }
        match self {
            Column::Bool(v) => Column::Bool(f(v, keep)),
            Column::Int(v) => Column::Int(f(v, keep)),
            Column::Float(v) => Column::Float(f(v, keep)),
            Column::Str(v) => Column::Str(f(v, keep)),
            Column::Ts(v) => Column::Ts(f(v, keep)),
            Column::Any(v) => Column::Any(f(v, keep)),
        }
    }

    /// The rows at `idx`, in that order.
    pub fn take(&self, idx: &[u32]) -> Column {
        fn t<T: Clone>(v: &[T], idx: &[u32]) -> Vec<T> {
            idx.iter().map(|i| v[*i as usize].clone()).collect()
        }
        match self {
            Column::Bool(v) => Column::Bool(t(v, idx)),
            Column::Int(v) => Column::Int(t(v, idx)),
            Column::Float(v) => Column::Float(t(v, idx)),
            Column::Str(v) => Column::Str(t(v, idx)),
            Column::Ts(v) => Column::Ts(t(v, idx)),
            Column::Any(v) => Column::Any(t(v, idx)),
        }
    }

    /// Builds the tightest column for a list of values.
    pub fn from_values(values: Vec<Value>) -> Column {
        let mut b = ColumnBuilder::new();
        for v in values {
            b.push(v);
        }
        b.finish()
    }
}

/// Builds a column from values, typed while the values agree, `Any` after.
#[derive(Default)]
pub struct ColumnBuilder {
    col: Option<Column>,
    len: usize,
}

impl ColumnBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, v: Value) {
        let col = match self.col.take() {
            None => match v {
                Value::Bool(b) => Column::Bool(vec![b]),
                Value::Int(i) => Column::Int(vec![i]),
                Value::Float(f) => Column::Float(vec![f]),
                Value::Str(s) => Column::Str(vec![s]),
                Value::Ts(t) => Column::Ts(vec![t]),
                Value::Null => Column::Any(vec![Value::Null]),
            },
            Some(mut c) => {
                let pushed = match (&mut c, &v) {
                    (Column::Bool(x), Value::Bool(b)) => {
                        x.push(*b);
                        true
                    }
                    (Column::Int(x), Value::Int(i)) => {
                        x.push(*i);
                        true
                    }
                    (Column::Float(x), Value::Float(f)) => {
                        x.push(*f);
                        true
                    }
                    (Column::Str(x), Value::Str(s)) => {
                        x.push(s.clone());
                        true
                    }
                    (Column::Ts(x), Value::Ts(t)) => {
                        x.push(*t);
                        true
                    }
                    (Column::Any(x), _) => {
                        x.push(v.clone());
                        true
                    }
                    _ => false,
                };
                if pushed {
                    c
                } else {
                    let mut vals: Vec<Value> = (0..c.len()).map(|i| c.get(i)).collect();
                    vals.push(v);
                    Column::Any(vals)
                }
            }
        };
        self.col = Some(col);
        self.len += 1;
    }

    pub fn finish(self) -> Column {
        self.col.unwrap_or(Column::Any(Vec::new()))
    }
}

/// A batch of records sharing one schema, with their event times.
#[derive(Clone, Debug)]
pub struct Batch {
    pub schema: SchemaRef,
    pub columns: Vec<Column>,
    /// Event time of each row (epoch ms).
    pub ts: Vec<i64>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Keeps the rows whose flag is set.
    pub fn filter(&self, keep: &[bool]) -> Batch {
        Batch {
            schema: self.schema.clone(),
            columns: self.columns.iter().map(|c| c.filter(keep)).collect(),
            ts: self
                .ts
                .iter()
                .zip(keep)
                .filter(|(_, k)| **k)
                .map(|(t, _)| *t)
                .collect(),
        }
    }

    /// The rows at `idx`.
    pub fn take(&self, idx: &[u32]) -> Batch {
        Batch {
            schema: self.schema.clone(),
            columns: self.columns.iter().map(|c| c.take(idx)).collect(),
            ts: idx.iter().map(|i| self.ts[*i as usize]).collect(),
        }
    }

    /// Appends row `i` as one JSON object line (with a trailing newline).
    pub fn write_json_row(&self, i: usize, out: &mut String) {
        out.push('{');
        for (c, (field, col)) in self.schema.fields.iter().zip(&self.columns).enumerate() {
            if c > 0 {
                out.push(',');
            }
            ferry_core::value::write_json_str(&field.name, out);
            out.push(':');
            match col {
                Column::Int(v) => {
                    use std::fmt::Write;
                    let _ = write!(out, "{}", v[i]);
                }
                _ => col.get(i).write_json(out),
            }
        }
        out.push_str("}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::schema::Schema;
    use ferry_core::value::DataType;

    #[test]
    fn builder_degrades_to_any_on_mixed_values() {
        let mut b = ColumnBuilder::new();
        b.push(Value::Int(1));
        b.push(Value::Int(2));
        assert_eq!(b.col, Some(Column::Int(vec![1, 2])));
        b.push(Value::Null);
        assert_eq!(
            b.finish(),
            Column::Any(vec![Value::Int(1), Value::Int(2), Value::Null])
        );
    }

    #[test]
    fn json_rows_parse_back() {
        let schema = Arc::new(Schema::new([
            ("user".to_string(), DataType::String),
            ("n".to_string(), DataType::Int),
            ("t".to_string(), DataType::Timestamp),
        ]));
        let b = Batch {
            schema,
            columns: vec![
                Column::Str(vec!["a\"x".into()]),
                Column::Int(vec![7]),
                Column::Ts(vec![0]),
            ],
            ts: vec![0],
        };
        let mut s = String::new();
        b.write_json_row(0, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user": "a\"x", "n": 7, "t": "1970-01-01T00:00:00.000Z"})
        );
    }
}

//! Compiled expressions over record batches.
//!
//! A CEL expression is compiled once per operator. Trees made only of field
//! references, literals, comparisons, arithmetic and `&&`/`||`/`!` over
//! statically typed fields run natively, a column at a time; anything else
//! runs in the CEL interpreter with one reused context per operator, setting
//! only the referenced fields per record.

use std::sync::Arc;

use cel_interpreter::{Context, Program};
use cel_parser::ast::{Expr, IdedExpr};
use cel_parser::reference::Val;
use ferry_core::schema::Schema;
use ferry_core::value::{DataType, Value};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Column};

#[derive(Clone, Copy, Debug, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Natively evaluable expression tree with static types.
#[derive(Debug)]
enum Native {
    Field(usize),
    Lit(Value),
    Cmp(CmpOp, Box<Native>, Box<Native>),
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
    Not(Box<Native>),
    Arith(ArithOp, Box<Native>, Box<Native>),
}

/// A compiled expression.
pub struct CompiledExpr {
    source: String,
    native: Option<Native>,
    program: Option<Program>,
    /// Field name and column index of every field the expression reads.
    refs: Vec<(String, usize)>,
    ctx: Context<'static>,
    /// Checked between records on the interpreted path, so that cancelling
    /// a job never waits for a whole batch of slow expressions.
    cancel: Option<CancellationToken>,
    /// Rows evaluated and rows that failed, until [`HOPELESS_AFTER`].
    seen: u64,
    failed: u64,
    first_error: Option<String>,
}

/// After this many rows, an expression that failed on every one of them
/// fails the job instead of silently dropping everything.
pub const HOPELESS_AFTER: u64 = 1000;

/// Rows between cancellation checks on the interpreted path.
const CANCEL_CHECK_ROWS: usize = 64;

impl std::fmt::Debug for CompiledExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledExpr")
            .field("source", &self.source)
            .field("native", &self.native.is_some())
            .finish()
    }
}

/// Result of evaluating over a batch: the column and how many rows failed
/// (failed rows are `Null`).
pub struct Evaluated {
    pub column: Column,
    pub errors: u64,
}

impl CompiledExpr {
    /// Compiles `source` against `schema` (already validated by the spec).
    pub fn compile(source: &str, schema: &Schema) -> Result<Self, String> {
        let ast = ferry_core::spec::expr::parse_expr(source)?;
        let native = to_native(&ast, schema);
        let program = if native.is_none() {
            Some(Program::compile(source).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let mut refs = Vec::new();
        collect_fields(&ast, schema, &mut refs);
        refs.sort();
        refs.dedup();
        Ok(Self {
            source: source.to_string(),
            native,
            program,
            refs,
            ctx: Context::default(),
            cancel: None,
            seen: 0,
            failed: 0,
            first_error: None,
        })
    }

    /// Stops interpreted evaluation between records once `token` fires.
    pub fn cancel_on(&mut self, token: CancellationToken) {
        self.cancel = Some(token);
    }

    /// Why the job should fail: the expression failed on every one of the
    /// first [`HOPELESS_AFTER`] or more rows it saw.
    pub fn hopeless(&self) -> Option<String> {
        (self.seen >= HOPELESS_AFTER && self.failed == self.seen).then(|| {
            format!(
                "the expression '{}' failed on every one of the first {} records ({}); fix \
                 the expression or the input",
                self.source,
                self.seen,
                self.first_error
                    .as_deref()
                    .unwrap_or("its result has the wrong type")
            )
        })
    }

    fn tally(&mut self, rows: usize, errors: u64) {
        if self.seen < HOPELESS_AFTER {
            self.seen += rows as u64;
            self.failed += errors;
        }
    }

    /// True if the expression runs on the native fast path.
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// Evaluates the expression for every row of `batch`.
    pub fn eval(&mut self, batch: &Batch) -> Evaluated {
        let r = self.eval_rows(batch);
        self.tally(batch.len(), r.errors);
        r
    }

    fn eval_rows(&mut self, batch: &Batch) -> Evaluated {
        if let Some(n) = &self.native {
            let (column, errors) = eval_native(n, batch);
            if errors > 0 && self.first_error.is_none() {
                self.first_error = Some("an operand is null or of the wrong type".into());
            }
            return Evaluated { column, errors };
        }
        let program = self
            .program
            .as_ref()
            .expect("interpreted expression has a program");
        let mut out = Vec::with_capacity(batch.len());
        let mut errors = 0;
        for row in 0..batch.len() {
            if row % CANCEL_CHECK_ROWS == 0
                && self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
            {
                // The task is going away: the rest of the batch is never used.
                out.resize(batch.len(), Value::Null);
                break;
            }
            for (name, idx) in &self.refs {
                self.ctx
                    .add_variable_from_value(name.clone(), to_cel(batch.columns[*idx].get(row)));
            }
            // The interpreter panics on some values (a macro over a bool):
            // that record's evaluation fails, the task goes on.
            let run = ferry_core::spec::expr::quietly(|| program.execute(&self.ctx))
                .unwrap_or_else(|_| {
                    Err(cel_interpreter::ExecutionError::function_error(
                        "interpreter",
                        "cannot evaluate the expression on this record",
                    ))
                });
            match run {
                Ok(v) => match from_cel(v) {
                    Some(v) => out.push(v),
                    None => {
                        errors += 1;
                        out.push(Value::Null)
                    }
                },
                Err(e) => {
                    errors += 1;
                    if self.first_error.is_none() {
                        let mut msg = e.to_string();
                        msg.truncate(200);
                        self.first_error = Some(msg);
                    }
                    out.push(Value::Null);
                }
            }
        }
        Evaluated {
            column: Column::from_values(out),
            errors,
        }
    }

    /// Evaluates as a condition: `true` rows are kept; errors and non-bools drop.
    pub fn eval_mask(&mut self, batch: &Batch) -> (Vec<bool>, u64) {
        let Evaluated { column, mut errors } = self.eval(batch);
        let mask = match column {
            Column::Bool(v) => v,
            Column::Any(v) => v
                .into_iter()
                .map(|x| match x {
                    Value::Bool(b) => b,
                    Value::Null => false,
                    _ => {
                        errors += 1;
                        false
                    }
                })
                .collect(),
            other => {
                errors += other.len() as u64;
                vec![false; other.len()]
            }
        };
        (mask, errors)
    }
}

fn collect_fields(e: &IdedExpr, schema: &Schema, out: &mut Vec<(String, usize)>) {
    match &e.expr {
        Expr::Ident(n) => {
            if let Some(i) = schema.index_of(n) {
                out.push((n.clone(), i));
            }
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                collect_fields(t, schema, out);
            }
            for a in &c.args {
                collect_fields(a, schema, out);
            }
        }
        Expr::Select(s) => collect_fields(&s.operand, schema, out),
        Expr::List(l) => l
            .elements
            .iter()
            .for_each(|x| collect_fields(x, schema, out)),
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_fields(x, schema, out);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let cel_parser::ast::EntryExpr::MapEntry(me) = &entry.expr {
                    collect_fields(&me.key, schema, out);
                    collect_fields(&me.value, schema, out);
                }
            }
        }
        _ => {}
    }
}

/// Static type of a native node.
fn native_type(n: &Native, schema: &Schema) -> DataType {
    match n {
        Native::Field(i) => schema.fields[*i].data_type,
        Native::Lit(v) => v.data_type(),
        Native::Cmp(..) | Native::And(..) | Native::Or(..) | Native::Not(_) => DataType::Bool,
        Native::Arith(op, a, b) => match (native_type(a, schema), native_type(b, schema), op) {
            (DataType::Int, DataType::Int, ArithOp::Div) => DataType::Any,
            (DataType::Int, DataType::Int, _) => DataType::Int,
            _ => DataType::Float,
        },
    }
}

fn to_native(e: &IdedExpr, schema: &Schema) -> Option<Native> {
    let n = match &e.expr {
        Expr::Ident(name) => {
            let i = schema.index_of(name)?;
            if schema.fields[i].data_type == DataType::Any {
                return None;
            }
            Native::Field(i)
        }
        Expr::Literal(v) => Native::Lit(match v {
            Val::String(s) => Value::Str(s.as_str().into()),
            Val::Boolean(b) => Value::Bool(*b),
            Val::Int(i) => Value::Int(*i),
            Val::UInt(u) => Value::Int(i64::try_from(*u).ok()?),
            Val::Double(d) => Value::Float(*d),
            _ => return None,
        }),
        Expr::Call(c) if c.target.is_none() => {
            let arg = |i: usize| {
                c.args
                    .get(i)
                    .and_then(|a| to_native(a, schema))
                    .map(Box::new)
            };
            match (c.func_name.as_str(), c.args.len()) {
                ("_&&_", 2) => Native::And(arg(0)?, arg(1)?),
                ("_||_", 2) => Native::Or(arg(0)?, arg(1)?),
                ("!_", 1) => Native::Not(arg(0)?),
                (f, 2) => {
                    let (a, b) = (arg(0)?, arg(1)?);
                    let (ta, tb) = (native_type(&a, schema), native_type(&b, schema));
                    let numeric = |t: DataType| matches!(t, DataType::Int | DataType::Float);
                    let cmp = |op| -> Option<Native> {
                        let ok = (numeric(ta) && numeric(tb))
                            || (ta == tb && ta != DataType::Any && ta != DataType::Bool)
                            || (ta == DataType::Bool
                                && tb == DataType::Bool
                                && matches!(op, CmpOp::Eq | CmpOp::Ne));
                        ok.then(|| Native::Cmp(op, a.clone_box(), b.clone_box()))
                    };
                    let arith = |op| -> Option<Native> {
                        (numeric(ta)
                            && numeric(tb)
                            && !(op == ArithOp::Div && ta == DataType::Int && tb == DataType::Int))
                            .then(|| Native::Arith(op, a.clone_box(), b.clone_box()))
                    };
                    match f {
                        "_==_" => cmp(CmpOp::Eq)?,
                        "_!=_" => cmp(CmpOp::Ne)?,
                        "_<_" => cmp(CmpOp::Lt)?,
                        "_<=_" => cmp(CmpOp::Le)?,
                        "_>_" => cmp(CmpOp::Gt)?,
                        "_>=_" => cmp(CmpOp::Ge)?,
                        "_+_" => arith(ArithOp::Add)?,
                        "_-_" => arith(ArithOp::Sub)?,
                        "_*_" => arith(ArithOp::Mul)?,
                        "_/_" => arith(ArithOp::Div)?,
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    // Logical operators need boolean operands.
    match &n {
        Native::And(a, b) | Native::Or(a, b)
            if native_type(a, schema) != DataType::Bool
                || native_type(b, schema) != DataType::Bool =>
        {
            return None;
        }
        Native::Not(a) if native_type(a, schema) != DataType::Bool => return None,
        _ => {}
    }
    Some(n)
}

impl Native {
    fn clone_box(&self) -> Box<Native> {
        Box::new(match self {
            Native::Field(i) => Native::Field(*i),
            Native::Lit(v) => Native::Lit(v.clone()),
            Native::Cmp(o, a, b) => Native::Cmp(*o, a.clone_box(), b.clone_box()),
            Native::And(a, b) => Native::And(a.clone_box(), b.clone_box()),
            Native::Or(a, b) => Native::Or(a.clone_box(), b.clone_box()),
            Native::Not(a) => Native::Not(a.clone_box()),
            Native::Arith(o, a, b) => Native::Arith(*o, a.clone_box(), b.clone_box()),
        })
    }
}

/// A column or a broadcast scalar.
enum Operand<'a> {
    Col(std::borrow::Cow<'a, Column>),
    Scalar(Value),
}

fn operand<'a>(n: &Native, batch: &'a Batch, errors: &mut u64) -> Operand<'a> {
    match n {
        Native::Field(i) => Operand::Col(std::borrow::Cow::Borrowed(&batch.columns[*i])),
        Native::Lit(v) => Operand::Scalar(v.clone()),
        other => {
            let (c, e) = eval_native(other, batch);
            *errors += e;
            Operand::Col(std::borrow::Cow::Owned(c))
        }
    }
}

fn eval_native(n: &Native, batch: &Batch) -> (Column, u64) {
    let len = batch.len();
    let mut errors = 0;
    let col = match n {
        Native::Field(i) => batch.columns[*i].clone(),
        Native::Lit(v) => Column::from_values(vec![v.clone(); len]),
        Native::Not(a) => {
            let (c, e) = eval_native(a, batch);
            errors += e;
            match c {
                Column::Bool(v) => Column::Bool(v.into_iter().map(|b| !b).collect()),
                _ => Column::Bool(vec![false; len]),
            }
        }
        Native::And(a, b) | Native::Or(a, b) => {
            let (ca, ea) = eval_native(a, batch);
            let (cb, eb) = eval_native(b, batch);
            errors += ea + eb;
            let and = matches!(n, Native::And(..));
            match (ca, cb) {
                (Column::Bool(x), Column::Bool(y)) => Column::Bool(
                    x.iter()
                        .zip(&y)
                        .map(|(p, q)| if and { *p && *q } else { *p || *q })
                        .collect(),
                ),
                _ => Column::Bool(vec![false; len]),
            }
        }
        Native::Cmp(op, a, b) => {
            let (oa, ob) = (
                operand(a, batch, &mut errors),
                operand(b, batch, &mut errors),
            );
            Column::Bool(compare(*op, &oa, &ob, len))
        }
        Native::Arith(op, a, b) => {
            let (oa, ob) = (
                operand(a, batch, &mut errors),
                operand(b, batch, &mut errors),
            );
            arith(*op, &oa, &ob, len, &mut errors)
        }
    };
    (col, errors)
}

fn cmp_ord<T: PartialOrd>(op: CmpOp, a: T, b: T) -> bool {
    match op {
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
    }
}

fn compare(op: CmpOp, a: &Operand, b: &Operand, len: usize) -> Vec<bool> {
    use Operand::*;
    match (a, b) {
        (Col(c), Scalar(s)) => match (c.as_ref(), s) {
            (Column::Int(v), Value::Int(x)) => v.iter().map(|y| cmp_ord(op, *y, *x)).collect(),
            (Column::Float(v), Value::Float(x)) => v.iter().map(|y| cmp_ord(op, *y, *x)).collect(),
            (Column::Float(v), Value::Int(x)) => {
                let x = *x as f64;
                v.iter().map(|y| cmp_ord(op, *y, x)).collect()
            }
            (Column::Int(v), Value::Float(x)) => {
                v.iter().map(|y| cmp_ord(op, *y as f64, *x)).collect()
            }
            (Column::Str(v), Value::Str(x)) => v
                .iter()
                .map(|y| cmp_ord(op, y.as_ref(), x.as_ref()))
                .collect(),
            (Column::Ts(v), Value::Ts(x)) => v.iter().map(|y| cmp_ord(op, *y, *x)).collect(),
            (Column::Bool(v), Value::Bool(x)) => v.iter().map(|y| cmp_ord(op, *y, *x)).collect(),
            (c, s) => (0..len).map(|i| value_cmp(op, &c.get(i), s)).collect(),
        },
        (Scalar(s), Col(_)) => {
            let flipped = match op {
                CmpOp::Lt => CmpOp::Gt,
                CmpOp::Le => CmpOp::Ge,
                CmpOp::Gt => CmpOp::Lt,
                CmpOp::Ge => CmpOp::Le,
                o => o,
            };
            compare(flipped, b, &Scalar(s.clone()), len)
        }
        (Col(x), Col(y)) => match (x.as_ref(), y.as_ref()) {
            (Column::Int(p), Column::Int(q)) => {
                p.iter().zip(q).map(|(a, b)| cmp_ord(op, a, b)).collect()
            }
            (Column::Float(p), Column::Float(q)) => {
                p.iter().zip(q).map(|(a, b)| cmp_ord(op, a, b)).collect()
            }
            (p, q) => (0..len)
                .map(|i| value_cmp(op, &p.get(i), &q.get(i)))
                .collect(),
        },
        (Scalar(x), Scalar(y)) => vec![value_cmp(op, x, y); len],
    }
}

fn value_cmp(op: CmpOp, a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => cmp_ord(op, x, y),
        (Value::Bool(x), Value::Bool(y)) => cmp_ord(op, x, y),
        (Value::Ts(x), Value::Ts(y)) => cmp_ord(op, x, y),
        (Value::Int(x), Value::Int(y)) => cmp_ord(op, x, y),
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => cmp_ord(op, x, y),
            _ => op == CmpOp::Ne,
        },
    }
}

fn arith(op: ArithOp, a: &Operand, b: &Operand, len: usize, errors: &mut u64) -> Column {
    let ints = |o: &Operand| match o {
        Operand::Col(c) => matches!(c.as_ref(), Column::Int(_)),
        Operand::Scalar(v) => matches!(v, Value::Int(_)),
    };
    let int_at = |o: &Operand, i: usize| match o {
        Operand::Col(c) => match c.as_ref() {
            Column::Int(v) => v[i],
            _ => 0,
        },
        Operand::Scalar(Value::Int(x)) => *x,
        _ => 0,
    };
    let f_at = |o: &Operand, i: usize| match o {
        Operand::Col(c) => c.f64_at(i).unwrap_or(f64::NAN),
        Operand::Scalar(v) => v.as_f64().unwrap_or(f64::NAN),
    };
    if ints(a) && ints(b) && op != ArithOp::Div {
        let mut nulls = false;
        let vals: Vec<Option<i64>> = (0..len)
            .map(|i| {
                let (x, y) = (int_at(a, i), int_at(b, i));
                let r = match op {
                    ArithOp::Add => x.checked_add(y),
                    ArithOp::Sub => x.checked_sub(y),
                    ArithOp::Mul => x.checked_mul(y),
                    ArithOp::Div => None,
                };
                if r.is_none() {
                    nulls = true;
                    *errors += 1;
                }
                r
            })
            .collect();
        if nulls {
            return Column::Any(
                vals.into_iter()
                    .map(|v| v.map_or(Value::Null, Value::Int))
                    .collect(),
            );
        }
        return Column::Int(vals.into_iter().map(|v| v.unwrap_or_default()).collect());
    }
    Column::Float(
        (0..len)
            .map(|i| {
                let (x, y) = (f_at(a, i), f_at(b, i));
                match op {
                    ArithOp::Add => x + y,
                    ArithOp::Sub => x - y,
                    ArithOp::Mul => x * y,
                    ArithOp::Div => x / y,
                }
            })
            .collect(),
    )
}

fn to_cel(v: Value) -> cel_interpreter::Value {
    use cel_interpreter::Value as C;
    match v {
        Value::Null => C::Null,
        Value::Bool(b) => C::Bool(b),
        Value::Int(i) => C::Int(i),
        Value::Float(f) => C::Float(f),
        Value::Str(s) => C::String(Arc::new(s.to_string())),
        Value::Ts(ms) => match chrono::DateTime::from_timestamp_millis(ms) {
            Some(t) => C::Timestamp(t.fixed_offset()),
            None => C::Int(ms),
        },
    }
}

fn from_cel(v: cel_interpreter::Value) -> Option<Value> {
    use cel_interpreter::Value as C;
    Some(match v {
        C::Null => Value::Null,
        C::Bool(b) => Value::Bool(b),
        C::Int(i) => Value::Int(i),
        C::UInt(u) => Value::Int(i64::try_from(u).ok()?),
        C::Float(f) => Value::Float(f),
        C::String(s) => Value::Str(s.as_str().into()),
        C::Timestamp(t) => Value::Ts(t.timestamp_millis()),
        C::Duration(d) => Value::Int(d.num_milliseconds()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        let schema = Arc::new(Schema::new([
            ("user".to_string(), DataType::String),
            ("amount".to_string(), DataType::Float),
            ("n".to_string(), DataType::Int),
        ]));
        Batch {
            schema,
            columns: vec![
                Column::Str(vec!["a".into(), "b".into(), "c".into()]),
                Column::Float(vec![5.0, 15.0, 25.0]),
                Column::Int(vec![1, 2, i64::MAX]),
            ],
            ts: vec![0, 1, 2],
        }
    }

    /// Native and interpreted evaluation agree on the same expressions.
    #[test]
    fn native_matches_interpreter() {
        let b = batch();
        for src in [
            "amount > 10.0",
            "amount > 10",
            "user == 'b' || n == 1",
            "!(amount >= 15.0) && n < 3",
            "amount * 2.0 + 1.0",
            "n + 1",
            "10 < amount",
        ] {
            let mut fast = CompiledExpr::compile(src, &b.schema).unwrap();
            assert!(fast.is_native(), "{src} should compile natively");
            let mut slow = CompiledExpr::compile(src, &b.schema).unwrap();
            slow.native = None;
            slow.program = Some(Program::compile(src).unwrap());
            let (f, s) = (fast.eval(&b), slow.eval(&b));
            let fv: Vec<Value> = (0..3).map(|i| f.column.get(i)).collect();
            let sv: Vec<Value> = (0..3).map(|i| s.column.get(i)).collect();
            assert_eq!(fv, sv, "{src}");
            assert_eq!(f.errors, s.errors, "{src}");
        }
    }

    #[test]
    fn falls_back_to_the_interpreter_for_functions() {
        let b = batch();
        let mut e =
            CompiledExpr::compile("user.startsWith('a') || size(user) > 3", &b.schema).unwrap();
        assert!(!e.is_native());
        let (mask, errors) = e.eval_mask(&b);
        assert_eq!(mask, vec![true, false, false]);
        assert_eq!(errors, 0);
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let b = batch();
        let mut e = CompiledExpr::compile("n * 2", &b.schema).unwrap();
        let r = e.eval(&b);
        assert_eq!(r.errors, 1);
        assert_eq!(r.column.get(2), Value::Null);
        assert_eq!(r.column.get(1), Value::Int(4));
    }

    #[test]
    fn an_expression_failing_on_every_record_is_hopeless() {
        let b = batch();
        // `n * 1000000000000000000` overflows on rows 1 and 2 only: some
        // records succeed, so the expression is never hopeless.
        let mut partly = CompiledExpr::compile("n * 4611686018427387904", &b.schema).unwrap();
        // Index 5 of a one-element list fails on every row.
        let mut always = CompiledExpr::compile("[user][5] + 'x'", &b.schema).unwrap();
        let mut rows = 0;
        while rows < HOPELESS_AFTER {
            assert!(
                always.hopeless().is_none(),
                "not before {HOPELESS_AFTER} rows"
            );
            assert!(partly.eval(&b).errors < 3);
            assert_eq!(always.eval(&b).errors, 3);
            rows += 3;
        }
        let why = always.hopeless().expect("every row failed");
        assert!(
            why.contains("[user][5] + 'x'") && why.contains("every one of the first"),
            "{why}"
        );
        assert!(partly.hopeless().is_none());
    }

    #[test]
    fn a_cancelled_task_stops_evaluating_between_records() {
        let rows = 1000;
        let b = Batch {
            schema: Arc::new(Schema::new([("n".to_string(), DataType::Int)])),
            columns: vec![Column::Int((0..rows).collect())],
            ts: vec![0; rows as usize],
        };
        let mut e = CompiledExpr::compile("[n].map(x, x + 1)[0]", &b.schema).unwrap();
        let token = CancellationToken::new();
        e.cancel_on(token.clone());
        let before = e.eval(&b);
        assert_eq!(before.column.get(999), Value::Int(1000));
        token.cancel();
        let after = e.eval(&b);
        // Stopped at the first check: nothing evaluated, nothing counted
        // as an error.
        assert_eq!(after.column.len(), rows as usize);
        assert_eq!(after.column.get(0), Value::Null);
        assert_eq!(after.errors, 0);
    }

    /// Found by fuzzing: the interpreter panics on a macro over a bool. The
    /// record's evaluation fails; the others go on.
    #[test]
    fn an_interpreter_panic_fails_only_its_record() {
        let b = batch();
        let src = "(n > 1 ? [1] : true).exists(v, v == 1)";
        ferry_core::spec::expr::check_expr(src, &b.schema).expect("passes validation");
        let mut e = CompiledExpr::compile(src, &b.schema).unwrap();
        let r = e.eval(&b);
        assert_eq!(r.errors, 1);
        assert_eq!(r.column.get(0), Value::Null);
        assert_eq!(r.column.get(1), Value::Bool(true));
        assert_eq!(r.column.get(2), Value::Bool(true));
    }
}

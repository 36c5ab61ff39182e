//! Static checks of CEL expressions against a record schema: syntax, unknown
//! fields and functions, operand types where they are known, the result
//! type, and (in [`bound`]) what one evaluation may allocate and compute.

pub mod bound;

use cel_parser::ast::{Expr, IdedExpr, operators};
use cel_parser::reference::Val;

use crate::schema::Schema;
use crate::value::DataType;

/// Longest expression accepted, in bytes. The CEL parser recurses per
/// nesting level and per chained operator; this bound (with
/// [`MAX_EXPR_NESTING`]) keeps it far from the stack limit of a 2 MiB thread.
pub const MAX_EXPR_LEN: usize = 2048;
/// Deepest nesting of `(`, `[` and `{` accepted in an expression.
pub const MAX_EXPR_NESTING: usize = 32;

/// Parses `source` as CEL. Errors carry the position inside the expression.
pub fn parse_expr(source: &str) -> Result<IdedExpr, String> {
    if source.len() > MAX_EXPR_LEN {
        return Err(format!(
            "expression is {} bytes long; the limit is {MAX_EXPR_LEN} (split the logic over several operators)",
            source.len()
        ));
    }
    let mut depth = 0usize;
    for c in source.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_EXPR_NESTING {
            return Err(format!(
                "expression nests brackets more than {MAX_EXPR_NESTING} deep; simplify it"
            ));
        }
    }
    // The generated parser panics on some malformed input (e.g. `a >`);
    // that is a syntax error, not a crash, and not worth a panic message.
    let parsed = quietly(|| cel_parser::Parser::default().parse(source))
        .map_err(|_| "syntax error: the expression is incomplete or malformed".to_string())?;
    parsed.map_err(|errs| {
        errs.errors
            .iter()
            .map(|e| format!("{} (at {}:{} of the expression)", e.msg, e.pos.0, e.pos.1))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

thread_local! {
    /// Set while this thread runs CEL code under [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs CEL library code (parser or interpreter), turning a panic into an
/// `Err` without a panic message: the libraries panic on some inputs
/// (`a >`, a macro over a bool) that are bad expressions or bad records,
/// not crashes. Other threads' panics still print as usual.
pub fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|f| f.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    out
}

/// Checks an expression against `schema` and returns its inferred type.
pub fn check_expr(source: &str, schema: &Schema) -> Result<DataType, String> {
    let expr = parse_expr(source)?;
    let mut bound = Vec::new();
    let mut unknown = Vec::new();
    collect_unknown(&expr, schema, &mut bound, &mut unknown);
    if !unknown.is_empty() {
        unknown.sort();
        unknown.dedup();
        return Err(format!(
            "unknown field{} {} (fields here: {})",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|u| format!("'{u}'"))
                .collect::<Vec<_>>()
                .join(", "),
            schema.names().join(", ")
        ));
    }
    let mut problems = Vec::new();
    check_calls(&expr, schema, &mut problems);
    if !problems.is_empty() {
        problems.dedup();
        return Err(problems.join("; "));
    }
    bound::bound(&expr, schema)?;
    Ok(infer_type(&expr, schema))
}

/// Functions the runtime's interpreter provides, called as `f(x)`.
const GLOBAL_FUNCTIONS: &[&str] = &[
    "size",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "duration",
    "timestamp",
    "max",
    "min",
];

/// Functions the runtime's interpreter provides, called as `x.f(...)`.
const MEMBER_FUNCTIONS: &[&str] = &[
    "contains",
    "startsWith",
    "endsWith",
    "size",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
];

/// Operators the interpreter evaluates (macros are already expanded).
const OPERATORS: &[&str] = &[
    operators::CONDITIONAL,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::SUBSTRACT,
    operators::ADD,
    operators::MULTIPLY,
    operators::DIVIDE,
    operators::MODULO,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::NEGATE,
    operators::INDEX,
    operators::NOT_STRICTLY_FALSE,
    operators::IN,
];

/// How an operand reads in a message: a field or literal by name.
fn describe(e: &IdedExpr, ty: DataType) -> String {
    match &e.expr {
        Expr::Ident(name) => format!("field '{name}' ({ty})"),
        Expr::Literal(Val::String(s)) => format!("the string '{s}'"),
        Expr::Literal(Val::Int(i)) => format!("the {ty} {i}"),
        Expr::Literal(Val::UInt(u)) => format!("the {ty} {u}"),
        Expr::Literal(Val::Double(d)) => format!("the {ty} {d}"),
        Expr::Literal(Val::Boolean(b)) => format!("the {ty} {b}"),
        _ => format!("a {ty} expression"),
    }
}

/// Operand types that can meet in a comparison or an equality.
fn comparable(a: DataType, b: DataType) -> bool {
    a == DataType::Any || b == DataType::Any || a == b || (a.is_numeric() && b.is_numeric())
}

/// Finds calls of functions the runtime does not have, and operators
/// applied to operands of types they cannot take (where both are known).
fn check_calls(e: &IdedExpr, schema: &Schema, out: &mut Vec<String>) {
    let mut children: Vec<&IdedExpr> = Vec::new();
    match &e.expr {
        Expr::Call(c) => {
            let name = c.func_name.as_str();
            let known = if c.target.is_some() {
                MEMBER_FUNCTIONS.contains(&name)
            } else {
                GLOBAL_FUNCTIONS.contains(&name) || OPERATORS.contains(&name)
            };
            if !known {
                let (how, list) = if c.target.is_some() {
                    ("x.", MEMBER_FUNCTIONS)
                } else {
                    ("", GLOBAL_FUNCTIONS)
                };
                out.push(format!(
                    "unknown function '{how}{name}(…)'; the functions are {}, and the macros \
                     has, all, exists, exists_one, map and filter",
                    list.join(", ")
                ));
            }
            let types: Vec<DataType> = c.args.iter().map(|a| infer_type(a, schema)).collect();
            match (name, types.as_slice()) {
                (
                    operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS
                    | operators::EQUALS
                    | operators::NOT_EQUALS,
                    [a, b],
                ) if !comparable(*a, *b) => out.push(format!(
                    "{} cannot be compared with {}; convert one side (int(), double(), string())",
                    describe(&c.args[0], *a),
                    describe(&c.args[1], *b)
                )),
                (
                    operators::SUBSTRACT
                    | operators::MULTIPLY
                    | operators::DIVIDE
                    | operators::MODULO,
                    [a, b],
                ) if [*a, *b]
                    .iter()
                    .any(|t| *t != DataType::Any && !t.is_numeric()) =>
                {
                    out.push(format!(
                        "arithmetic needs numbers, not {} and {}",
                        describe(&c.args[0], *a),
                        describe(&c.args[1], *b)
                    ))
                }
                (operators::ADD, [a, b])
                    if *a != DataType::Any
                        && *b != DataType::Any
                        && !(a.is_numeric() && b.is_numeric())
                        && a != b =>
                {
                    out.push(format!(
                        "{} and {} cannot be added; convert one side (string(), double())",
                        describe(&c.args[0], *a),
                        describe(&c.args[1], *b)
                    ))
                }
                (operators::LOGICAL_AND | operators::LOGICAL_OR | operators::LOGICAL_NOT, ts) => {
                    for (arg, t) in c.args.iter().zip(ts) {
                        if !matches!(t, DataType::Bool | DataType::Any) {
                            out.push(format!(
                                "{} is not a condition (bool); compare it, e.g. `x > 0`",
                                describe(arg, *t)
                            ));
                        }
                    }
                }
                _ => {}
            }
            children.extend(c.target.as_deref());
            children.extend(&c.args);
        }
        Expr::Select(s) => children.push(&s.operand),
        Expr::List(l) => children.extend(&l.elements),
        Expr::Map(m) => {
            for entry in &m.entries {
                if let cel_parser::ast::EntryExpr::MapEntry(me) = &entry.expr {
                    children.push(&me.key);
                    children.push(&me.value);
                }
            }
        }
        Expr::Comprehension(c) => {
            let ty = infer_type(&c.iter_range, schema);
            if !matches!(ty, DataType::Any) {
                out.push(format!(
                    "the macros all, exists, exists_one, map and filter apply to lists and maps, not to {}",
                    describe(&c.iter_range, ty)
                ));
            }
            children.extend([
                &*c.iter_range,
                &*c.accu_init,
                &*c.loop_cond,
                &*c.loop_step,
                &*c.result,
            ]);
        }
        Expr::Struct(_) => out
            .push("message literals (`Type{...}`) are not supported; use a map `{'k': v}`".into()),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
    for child in children {
        check_calls(child, schema, out);
    }
}

fn collect_unknown(e: &IdedExpr, schema: &Schema, bound: &mut Vec<String>, out: &mut Vec<String>) {
    match &e.expr {
        Expr::Ident(name) => {
            if schema.index_of(name).is_none() && !bound.contains(name) && !is_builtin_ident(name) {
                out.push(name.clone());
            }
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                collect_unknown(t, schema, bound, out);
            }
            for a in &c.args {
                collect_unknown(a, schema, bound, out);
            }
        }
        Expr::Select(s) => collect_unknown(&s.operand, schema, bound, out),
        Expr::List(l) => {
            for x in &l.elements {
                collect_unknown(x, schema, bound, out);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let cel_parser::ast::EntryExpr::MapEntry(me) = &entry.expr {
                    collect_unknown(&me.key, schema, bound, out);
                    collect_unknown(&me.value, schema, bound, out);
                }
            }
        }
        Expr::Comprehension(c) => {
            collect_unknown(&c.iter_range, schema, bound, out);
            let n = bound.len();
            bound.push(c.iter_var.clone());
            if let Some(v2) = &c.iter_var2 {
                bound.push(v2.clone());
            }
            bound.push(c.accu_var.clone());
            collect_unknown(&c.accu_init, schema, bound, out);
            collect_unknown(&c.loop_cond, schema, bound, out);
            collect_unknown(&c.loop_step, schema, bound, out);
            collect_unknown(&c.result, schema, bound, out);
            bound.truncate(n);
        }
        Expr::Literal(_) | Expr::Struct(_) | Expr::Unspecified => {}
    }
}

fn is_builtin_ident(name: &str) -> bool {
    matches!(
        name,
        "int" | "uint" | "double" | "string" | "bool" | "bytes" | "null_type" | "type"
    )
}

/// Best-effort static type of an expression; `Any` where unknown.
pub fn infer_type(e: &IdedExpr, schema: &Schema) -> DataType {
    match &e.expr {
        Expr::Ident(name) => schema
            .field(name)
            .map(|f| f.data_type)
            .unwrap_or(DataType::Any),
        Expr::Literal(v) => match v {
            Val::String(_) => DataType::String,
            Val::Boolean(_) => DataType::Bool,
            Val::Int(_) | Val::UInt(_) => DataType::Int,
            Val::Double(_) => DataType::Float,
            Val::Bytes(_) | Val::Null => DataType::Any,
        },
        Expr::Call(c) => {
            let arg_types: Vec<DataType> = c.args.iter().map(|a| infer_type(a, schema)).collect();
            match c.func_name.as_str() {
                "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" | "_&&_" | "_||_" | "!_"
                | "@in" | "contains" | "startsWith" | "endsWith" | "matches" => DataType::Bool,
                "_+_" | "_-_" | "_*_" | "_/_" | "_%_" => {
                    match (arg_types.first(), arg_types.get(1)) {
                        (Some(DataType::Int), Some(DataType::Int)) => DataType::Int,
                        (Some(DataType::Float), Some(DataType::Float))
                        | (Some(DataType::Float), Some(DataType::Int))
                        | (Some(DataType::Int), Some(DataType::Float)) => DataType::Float,
                        (Some(DataType::String), Some(DataType::String))
                            if c.func_name == "_+_" =>
                        {
                            DataType::String
                        }
                        _ => DataType::Any,
                    }
                }
                "-_" => arg_types.first().copied().unwrap_or(DataType::Any),
                "size" | "int" => DataType::Int,
                "double" => DataType::Float,
                "string" => DataType::String,
                "_?_:_" => match (arg_types.get(1), arg_types.get(2)) {
                    (Some(a), Some(b)) if a == b => *a,
                    _ => DataType::Any,
                },
                _ => DataType::Any,
            }
        }
        _ => DataType::Any,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::new([
            ("user".to_string(), DataType::String),
            ("amount".to_string(), DataType::Float),
            ("n".to_string(), DataType::Int),
        ])
    }

    #[test]
    fn infers_types_and_rejects_unknown_fields() {
        let s = schema();
        assert_eq!(check_expr("amount > 10.0", &s), Ok(DataType::Bool));
        assert_eq!(check_expr("n * 2", &s), Ok(DataType::Int));
        assert_eq!(check_expr("amount * 2.0", &s), Ok(DataType::Float));
        assert_eq!(check_expr("user", &s), Ok(DataType::String));
        let err = check_expr("amount > limit", &s).unwrap_err();
        assert!(err.contains("'limit'"), "{err}");
        assert!(check_expr("amount >", &s).is_err());
        // Comprehension variables are not fields.
        assert_eq!(check_expr("[1, 2].exists(x, x > n)", &s), Ok(DataType::Any));
    }

    #[test]
    fn unknown_functions_and_mismatched_types_are_refused() {
        let s = schema();
        let e = check_expr("system('id') == ''", &s).unwrap_err();
        assert!(e.contains("unknown function 'system"), "{e}");
        let e = check_expr("user.exec()", &s).unwrap_err();
        assert!(e.contains("unknown function 'x.exec"), "{e}");
        // `matches` needs a regex engine the runtime is built without.
        assert!(check_expr("user.matches('a.*')", &s).is_err());
        let e = check_expr("amount > 'x'", &s).unwrap_err();
        assert!(
            e.contains("field 'amount' (float)") && e.contains("the string 'x'"),
            "{e}"
        );
        assert!(check_expr("user == 3", &s).is_err());
        assert!(check_expr("user * 2", &s).is_err());
        assert!(check_expr("user + 1", &s).is_err());
        assert!(check_expr("n && true", &s).is_err());
        // Numbers mix; unknown types are left to run time.
        assert_eq!(check_expr("n < amount", &s), Ok(DataType::Bool));
        assert_eq!(check_expr("user + '!'", &s), Ok(DataType::String));
        assert_eq!(
            check_expr("size(user) > 2 && user.startsWith('a')", &s),
            Ok(DataType::Bool)
        );
        assert_eq!(
            check_expr("[1, 2].map(x, x * 2)[0] > n", &s),
            Ok(DataType::Bool)
        );
    }
}

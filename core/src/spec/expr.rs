//! Static checks of CEL expressions against a record schema: syntax, unknown
//! fields, and the result type where it can be known before run time.

use cel_parser::ast::{Expr, IdedExpr};
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
    quiet_panics_in_parser();
    IN_PARSER.with(|f| f.set(true));
    let parsed = std::panic::catch_unwind(|| cel_parser::Parser::default().parse(source));
    IN_PARSER.with(|f| f.set(false));
    let parsed = parsed
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
    /// Set while this thread runs the CEL parser under `catch_unwind`.
    static IN_PARSER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for panics caught in
/// [`parse_expr`] and defers to the previous hook for every other panic.
fn quiet_panics_in_parser() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_PARSER.with(|f| f.get()) {
                previous(info);
            }
        }));
    });
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
    Ok(infer_type(&expr, schema))
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
}

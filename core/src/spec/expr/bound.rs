//! What one evaluation of an expression may allocate and compute, bounded
//! before the job runs.
//!
//! CEL has no loops of its own, but its macros (`map`, `filter`, `exists`,
//! `all`, `exists_one`) iterate over lists, and list concatenation inside
//! them can grow a value geometrically: a 1.5 KB expression of nested `map`s
//! built 3.5 GB, and a 1.4 KB `exists` cost seconds per record. So every
//! expression gets two upper bounds, computed from its syntax tree alone:
//!
//! - **values**: how many values (list elements, map entries, scalars) one
//!   result can hold, and
//! - **cost**: how many values one evaluation touches.
//!
//! Both are sound over-estimates: a record's field counts as one value
//! whatever its length (fields are bounded by the input's own limits), a
//! list element as big as its whole list, and a macro as running over every
//! element with the largest accumulator it can reach. An expression over
//! either limit is refused by validation, so evaluation needs no run-time
//! meter and cancelling a job never waits behind one record for long.

use cel_parser::ast::{EntryExpr, Expr, IdedExpr, operators};

use crate::schema::Schema;
use crate::value::DataType;

/// Most values one evaluation may build.
pub const MAX_VALUES: u64 = 10_000;
/// Most values one evaluation may touch. Measured with the runtime's
/// interpreter, one unit takes 3–25 ns, so a record costs at most about
/// 1.25 ms (and the interpreter checks for cancellation between records).
pub const MAX_COST: u64 = 50_000;

/// An upper bound `acc · A + k`, where `A` is the size of the accumulator
/// of the innermost macro being analysed (0 outside of one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Lin {
    acc: u64,
    k: u64,
}

impl Lin {
    const ONE: Lin = Lin { acc: 0, k: 1 };

    fn konst(k: u64) -> Lin {
        Lin { acc: 0, k }
    }

    fn plus(self, o: Lin) -> Lin {
        Lin {
            acc: self.acc.saturating_add(o.acc),
            k: self.k.saturating_add(o.k),
        }
    }

    fn max(self, o: Lin) -> Lin {
        Lin {
            acc: self.acc.max(o.acc),
            k: self.k.max(o.k),
        }
    }

    fn at(self, a: u64) -> u64 {
        self.acc.saturating_mul(a).saturating_add(self.k)
    }
}

/// Bounds of one (sub)expression: the values it holds, the values of its
/// largest element (0 for a scalar), and the values evaluating it touches.
#[derive(Clone, Copy, Debug, Default)]
struct Bounds {
    values: Lin,
    elem: Lin,
    cost: Lin,
}

/// What a variable in scope may hold.
#[derive(Clone, Copy, Debug)]
struct Var {
    values: Lin,
    elem: Lin,
}

/// The two bounds of a whole expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExprBounds {
    pub values: u64,
    pub cost: u64,
}

/// Bounds `e` (with fields of `schema`), or says which limit it breaks.
pub fn bound(e: &IdedExpr, schema: &Schema) -> Result<ExprBounds, String> {
    let mut vars = Vec::new();
    let b = walk(e, schema, &mut vars)?;
    let out = ExprBounds {
        values: b.values.at(0),
        cost: b.cost.at(0),
    };
    check(out)?;
    Ok(out)
}

fn check(b: ExprBounds) -> Result<(), String> {
    if b.values > MAX_VALUES {
        return Err(format!(
            "the expression can build more than {MAX_VALUES} values per record (nested or \
             repeated list operations); simplify it or split it over several operators"
        ));
    }
    if b.cost > MAX_COST {
        return Err(format!(
            "the expression can take more than {MAX_COST} steps per record (macros over large \
             lists, nested macros); simplify it or split it over several operators"
        ));
    }
    Ok(())
}

fn is_number(e: &IdedExpr, schema: &Schema) -> bool {
    matches!(
        crate::spec::expr::infer_type(e, schema),
        DataType::Int | DataType::Float
    )
}

fn walk(e: &IdedExpr, schema: &Schema, vars: &mut Vec<(String, Var)>) -> Result<Bounds, String> {
    let leaf = Bounds {
        values: Lin::ONE,
        elem: Lin::default(),
        cost: Lin::ONE,
    };
    Ok(match &e.expr {
        Expr::Literal(_) | Expr::Unspecified | Expr::Struct(_) => leaf,
        Expr::Ident(name) => match vars.iter().rev().find(|(n, _)| n == name) {
            Some((_, v)) => Bounds {
                values: v.values,
                elem: v.elem,
                cost: Lin::ONE,
            },
            None => leaf,
        },
        Expr::Select(s) => {
            let o = walk(&s.operand, schema, vars)?;
            if s.test {
                Bounds {
                    cost: o.cost.plus(Lin::ONE),
                    ..leaf
                }
            } else {
                Bounds {
                    values: o.elem.max(Lin::ONE),
                    elem: o.elem,
                    cost: o.cost.plus(Lin::ONE),
                }
            }
        }
        Expr::List(l) => {
            let mut b = leaf;
            for x in &l.elements {
                let x = walk(x, schema, vars)?;
                b.values = b.values.plus(x.values);
                b.elem = b.elem.max(x.values);
                b.cost = b.cost.plus(x.cost).plus(x.values);
            }
            b
        }
        Expr::Map(m) => {
            let mut b = leaf;
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    for x in [&me.key, &me.value] {
                        let x = walk(x, schema, vars)?;
                        b.values = b.values.plus(x.values);
                        b.elem = b.elem.max(x.values);
                        b.cost = b.cost.plus(x.cost).plus(x.values);
                    }
                }
            }
            b
        }
        Expr::Call(c) => {
            let mut args = Vec::with_capacity(c.args.len() + 1);
            if let Some(t) = &c.target {
                args.push(walk(t, schema, vars)?);
            }
            for a in &c.args {
                args.push(walk(a, schema, vars)?);
            }
            let work = args.iter().fold(Lin::ONE, |acc, a| acc.plus(a.cost));
            let all_values = args
                .iter()
                .fold(Lin::default(), |acc, a| acc.plus(a.values));
            match c.func_name.as_str() {
                operators::CONDITIONAL => Bounds {
                    values: args
                        .iter()
                        .skip(1)
                        .fold(Lin::ONE, |acc, a| acc.max(a.values)),
                    elem: args
                        .iter()
                        .skip(1)
                        .fold(Lin::default(), |acc, a| acc.max(a.elem)),
                    cost: work,
                },
                operators::ADD if !c.args.iter().any(|a| is_number(a, schema)) => Bounds {
                    values: all_values,
                    elem: args.iter().fold(Lin::default(), |acc, a| acc.max(a.elem)),
                    // Concatenation copies both sides.
                    cost: work.plus(all_values),
                },
                operators::INDEX => {
                    let container = args.first().copied().unwrap_or(leaf);
                    Bounds {
                        values: container.elem.max(Lin::ONE),
                        elem: container.elem,
                        cost: work,
                    }
                }
                // Conversions keep the size of what they convert.
                "string" | "bytes" => Bounds {
                    values: all_values.max(Lin::ONE),
                    elem: Lin::default(),
                    cost: work.plus(all_values),
                },
                // Everything else returns a scalar after reading its
                // arguments (equality and `in` compare whole values).
                _ => Bounds {
                    cost: work.plus(all_values),
                    ..leaf
                },
            }
        }
        Expr::Comprehension(c) => comprehension(c, schema, vars)?,
    })
}

/// A macro: bounds its accumulator by running its step's bound once per
/// element of the range.
fn comprehension(
    c: &cel_parser::ast::ComprehensionExpr,
    schema: &Schema,
    vars: &mut Vec<(String, Var)>,
) -> Result<Bounds, String> {
    let range = walk(&c.iter_range, schema, vars)?;
    let init = walk(&c.accu_init, schema, vars)?;
    if range.values.acc > 0 || init.values.acc > 0 || range.elem.acc > 0 || init.elem.acc > 0 {
        return Err(
            "the expression nests macros in a way that cannot be bounded; simplify it".into(),
        );
    }
    // The range has at most as many elements as values.
    let n = range.values.k;
    let item = Var {
        values: range.elem.max(Lin::ONE),
        elem: range.elem,
    };
    let depth = vars.len();
    let body = |vars: &mut Vec<(String, Var)>, accu: Var| {
        vars.push((c.iter_var.clone(), item));
        if let Some(v2) = &c.iter_var2 {
            vars.push((v2.clone(), item));
        }
        vars.push((c.accu_var.clone(), accu));
        let cond = walk(&c.loop_cond, schema, vars);
        let step = walk(&c.loop_step, schema, vars);
        vars.truncate(depth);
        Ok::<_, String>((cond?, step?))
    };
    // The accumulator's element bound: a fixed point when the step's
    // elements do not grow with the accumulator (as in `map` and
    // `filter`); otherwise as big as the whole accumulator.
    let symbolic = Lin { acc: 1, k: 0 };
    let mut elem = init.elem.k;
    let mut found = None;
    for _ in 0..4 {
        let (cond, step) = body(
            vars,
            Var {
                values: symbolic,
                elem: Lin::konst(elem),
            },
        )?;
        if step.elem.acc > 0 {
            break;
        }
        if step.elem.k <= elem {
            found = Some((cond, step));
            break;
        }
        elem = step.elem.k;
    }
    let (cond, step) = match found {
        Some(found) => found,
        None => body(
            vars,
            Var {
                values: symbolic,
                elem: symbolic,
            },
        )?,
    };
    let mut size = init.values.k;
    let mut cost = range.cost.k.saturating_add(init.cost.k);
    for _ in 0..n {
        cost = cost
            .saturating_add(cond.cost.at(size))
            .saturating_add(step.cost.at(size));
        size = size.max(step.values.at(size));
        check(ExprBounds { values: size, cost })?;
    }
    let elem = init.elem.k.max(step.elem.at(size)).min(size);
    vars.push((
        c.accu_var.clone(),
        Var {
            values: Lin::konst(size),
            elem: Lin::konst(elem),
        },
    ));
    let result = walk(&c.result, schema, vars);
    vars.truncate(depth);
    let result = result?;
    Ok(Bounds {
        values: result.values,
        elem: result.elem,
        cost: result.cost.plus(Lin::konst(cost)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::expr::parse_expr;

    fn bounds(src: &str) -> Result<ExprBounds, String> {
        let schema = Schema::new([
            ("user".to_string(), DataType::String),
            ("n".to_string(), DataType::Int),
        ]);
        bound(&parse_expr(src).unwrap(), &schema)
    }

    #[test]
    fn everyday_expressions_are_cheap() {
        for src in [
            "n > 3 && user != 'x'",
            "user.startsWith('a') ? n * 2 : n",
            "[1, 2, 3].exists(x, x == n)",
            "[1, 2, 3].map(x, x * n).filter(y, y > 2).size() > 1",
            "{'a': 1, 'b': 2}[user]",
        ] {
            let b = bounds(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert!(b.cost < 1000, "{src}: {b:?}");
        }
        // An independently counted case: a literal list of 3 scalars is 4
        // values (the list and its elements).
        assert_eq!(bounds("[1, 2, 3]").unwrap().values, 4);
    }

    #[test]
    fn geometric_growth_and_nested_macros_are_refused() {
        let l = format!("[{}]", vec!["1"; 40].join(","));
        // A map whose every element is the previous level: 10^k values.
        let ten = "[0,1,2,3,4,5,6,7,8,9]";
        let mut growing = ten.to_string();
        for v in ["a", "b", "c", "d"] {
            growing = format!("{ten}.map({v}, {growing})");
        }
        let e = bounds(&growing).unwrap_err();
        assert!(e.contains("per record"), "{e}");
        // Three nested macros over 40 elements: 64,000 steps.
        let nested = format!("{l}.exists(a, {l}.exists(b, {l}.exists(c, a + b + c == n)))");
        let e = bounds(&nested).unwrap_err();
        assert!(e.contains("steps per record"), "{e}");
        // Two nested over 30 elements (900 steps of a few values) pass.
        let l = format!("[{}]", vec!["1"; 30].join(","));
        bounds(&format!("{l}.exists(a, {l}.exists(b, a + b == n))")).unwrap();
    }

    #[test]
    fn a_map_grows_its_accumulator_linearly() {
        // `l.map(x, [x, x])` over 10 elements: 10 lists of 3 values plus
        // the outer list; each step copies the accumulator.
        let b = bounds("[0,1,2,3,4,5,6,7,8,9].map(x, [x, x])").unwrap();
        assert!(b.values >= 31, "{b:?}");
        assert!(b.values <= 200, "{b:?}");
    }
}

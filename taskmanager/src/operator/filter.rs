//! `filter`: keeps records for which a CEL condition holds.

use std::sync::atomic::Ordering;

use ferry_core::schema::Schema;

use crate::batch::Batch;
use crate::expr::CompiledExpr;
use crate::metrics::TaskMetrics;
use crate::operator::Operator;

pub struct Filter {
    expr: CompiledExpr,
}

impl Filter {
    pub fn new(expr: &str, schema: &Schema) -> Result<Self, String> {
        Ok(Self {
            expr: CompiledExpr::compile(expr, schema)?,
        })
    }
}

impl Operator for Filter {
    fn process(&mut self, batch: Batch, out: &mut Vec<Batch>, m: &TaskMetrics) {
        let (mask, errors) = self.expr.eval_mask(&batch);
        if errors > 0 {
            m.expr_errors.fetch_add(errors, Ordering::Relaxed);
        }
        if mask.iter().all(|k| *k) {
            out.push(batch);
        } else if mask.iter().any(|k| *k) {
            out.push(batch.filter(&mask));
        }
    }
}

//! `filter`: keeps records for which a CEL condition holds.

use std::sync::atomic::Ordering;

use ferry_core::schema::Schema;
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::expr::CompiledExpr;
use crate::metrics::TaskMetrics;
use crate::operator::Operator;

pub struct Filter {
    expr: CompiledExpr,
}

impl Filter {
    pub fn new(expr: &str, schema: &Schema, cancel: &CancellationToken) -> Result<Self, String> {
        let mut expr = CompiledExpr::compile(expr, schema)?;
        expr.cancel_on(cancel.clone());
        Ok(Self { expr })
    }
}

impl Operator for Filter {
    fn failure(&self) -> Option<String> {
        self.expr.hopeless()
    }

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

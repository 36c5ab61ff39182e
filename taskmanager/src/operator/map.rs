//! `map`: replaces each record by named CEL expressions over it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferry_core::schema::{Schema, SchemaRef};
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::expr::CompiledExpr;
use crate::metrics::TaskMetrics;
use crate::operator::Operator;

pub struct Map {
    exprs: Vec<CompiledExpr>,
    out_schema: SchemaRef,
}

impl Map {
    pub fn new(
        fields: &indexmap::IndexMap<String, String>,
        input: &Schema,
        output: &Schema,
        cancel: &CancellationToken,
    ) -> Result<Self, String> {
        Ok(Self {
            exprs: fields
                .values()
                .map(|e| {
                    let mut e = CompiledExpr::compile(e, input)?;
                    e.cancel_on(cancel.clone());
                    Ok::<_, String>(e)
                })
                .collect::<Result<_, _>>()?,
            out_schema: Arc::new(output.clone()),
        })
    }
}

impl Operator for Map {
    fn failure(&self) -> Option<String> {
        self.exprs.iter().find_map(|e| e.hopeless())
    }

    fn process(&mut self, batch: Batch, out: &mut Vec<Batch>, m: &TaskMetrics) {
        let mut columns = Vec::with_capacity(self.exprs.len());
        for e in &mut self.exprs {
            let r = e.eval(&batch);
            if r.errors > 0 {
                m.expr_errors.fetch_add(r.errors, Ordering::Relaxed);
            }
            columns.push(r.column);
        }
        out.push(Batch {
            schema: self.out_schema.clone(),
            columns,
            ts: batch.ts,
        });
    }
}

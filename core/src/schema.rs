//! Record schemas: the ordered, named, typed fields a stream carries at each
//! point of a job. Validation derives them operator by operator.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::value::DataType;

/// One named, typed field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub data_type: DataType,
}

/// The fields of a stream, in column order.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Schema {
    pub fields: Vec<Field>,
}

/// Schemas are shared between every batch of a stream.
pub type SchemaRef = Arc<Schema>;

impl Schema {
    pub fn new(fields: impl IntoIterator<Item = (String, DataType)>) -> Self {
        Self {
            fields: fields
                .into_iter()
                .map(|(name, data_type)| Field { name, data_type })
                .collect(),
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.fields.iter().map(|f| f.name.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

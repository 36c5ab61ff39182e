//! A serde `Deserializer` over the positioned YAML tree, so the typed spec is
//! read straight from the tree (keeping mapping order, which `fields` and
//! `schema` depend on) and every serde error becomes a message that says
//! what is expected.
//!
//! Invariant: errors carry a [`ErrorKind`] that the caller can act on
//! (unknown field / variant, missing field) and a message meant for the
//! person who wrote the spec, never serde's Rust type names.

use std::fmt;

use serde::de::{
    self, DeserializeSeed, EnumAccess, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

use super::tree::{Entry, Kind, Node, Pos, Scalar};

/// What went wrong, where the caller needs to know more than the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    UnknownField(String),
    UnknownVariant(String),
    MissingField(String),
    Other,
}

#[derive(Clone, Debug)]
pub(crate) struct DeError {
    pub kind: ErrorKind,
    pub message: String,
    /// The offending scalar as text, when serde named one.
    pub found: Option<String>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        let message = msg.to_string();
        let message = if message.starts_with("data did not match any variant of untagged enum") {
            "expected a field name or a list of field names".to_string()
        } else {
            message
        };
        DeError {
            kind: ErrorKind::Other,
            message,
            found: None,
        }
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn Expected) -> Self {
        let mut e = Self::custom(format!(
            "expected {}, found {}",
            expected(exp),
            found(&unexp)
        ));
        e.found = match unexp {
            Unexpected::Bool(b) => Some(b.to_string()),
            Unexpected::Unsigned(n) => Some(n.to_string()),
            Unexpected::Signed(n) => Some(n.to_string()),
            Unexpected::Str(s) => Some(s.to_string()),
            _ => None,
        };
        e
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        Self::custom(format!("expected {}, found {len} items", expected(exp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            kind: ErrorKind::UnknownVariant(variant.to_string()),
            message: one_of(variant, expected),
            found: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let message = if expected.is_empty() {
            format!("unknown field '{field}'; this takes no settings (write {{}})")
        } else {
            format!("unknown field '{field}'; {}", one_of(field, expected))
        };
        DeError {
            kind: ErrorKind::UnknownField(field.to_string()),
            message,
            found: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            kind: ErrorKind::MissingField(field.to_string()),
            message: format!("missing required field '{field}'"),
            found: None,
        }
    }

    fn duplicate_field(field: &'static str) -> Self {
        Self::custom(format!("'{field}' is set twice; keep only one"))
    }
}

/// `expected one of: a, b (did you mean 'b'?)`.
fn one_of(given: &str, options: &[&str]) -> String {
    let mut s = format!("expected one of: {}", options.join(", "));
    if let Some(best) = closest(given, options) {
        s.push_str(&format!(" (did you mean '{best}'?)"));
    }
    s
}

/// The option closest to `given` if it is plausibly a typo of it (same
/// letters ignoring case and `_`/`-`, or at most two edits away).
pub(crate) fn closest<'a>(given: &str, options: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let g = norm(given);
    if let Some(o) = options.iter().find(|o| norm(o) == g) {
        return Some(o);
    }
    let limit = if g.chars().count() <= 4 { 1 } else { 2 };
    options
        .iter()
        .map(|o| (edit_distance(&g, &norm(o)), *o))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What serde expected, in the words of a spec author.
fn expected(exp: &dyn Expected) -> String {
    let e = exp.to_string();
    match e.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" => {
            let max = match e.as_str() {
                "u8" => u64::from(u8::MAX),
                "u16" => u64::from(u16::MAX),
                "u32" => u64::from(u32::MAX),
                _ => u64::MAX,
            };
            format!("a whole number from 0 to {max}")
        }
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a map" => "a mapping of names to values".into(),
        "a sequence" => "a list".into(),
        "field identifier" | "variant identifier" => "a name".into(),
        _ if e.starts_with("struct ") => "a mapping of settings".into(),
        _ if e.starts_with("internally tagged enum") => {
            "a mapping with a 'type' key (e.g. {type: ...})".into()
        }
        _ => e,
    }
}

/// What was found, in the words of a spec author.
fn found(u: &Unexpected) -> String {
    match u {
        Unexpected::Bool(b) => format!("the boolean {b}"),
        Unexpected::Unsigned(n) => format!("the number {n}"),
        Unexpected::Signed(n) => format!("the number {n}"),
        Unexpected::Float(f) => format!("the number {f}"),
        Unexpected::Str(s) => format!("the text '{s}'"),
        Unexpected::Unit => "nothing (an empty value)".into(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a mapping".into(),
        other => other.to_string(),
    }
}

/// Deserializes from one node of the tree.
pub(crate) struct De<'a>(pub &'a Node);

static EMPTY_MAP: Node = Node {
    pos: Pos::START,
    kind: Kind::Map(Vec::new()),
};

/// What a variant written without settings (`sink: stdout`) reads as.
static NULL: Node = Node {
    pos: Pos::START,
    kind: Kind::Scalar(Scalar::Null, String::new()),
};

impl De<'_> {
    fn is_null(&self) -> bool {
        matches!(self.0.kind, Kind::Scalar(Scalar::Null, _))
    }
}

impl<'de> de::Deserializer<'de> for De<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Scalar(s, raw) => match s {
                Scalar::Null => v.visit_unit(),
                Scalar::Bool(b) => v.visit_bool(*b),
                Scalar::UInt(n) => v.visit_u64(*n),
                Scalar::Int(n) => v.visit_i64(*n),
                Scalar::Float(f) => v.visit_f64(*f),
                Scalar::BigInt => Err(de::Error::custom(format!(
                    "{raw} is too large; numbers must fit in 64 bits"
                ))),
                Scalar::Str => v.visit_str(raw),
            },
            Kind::Seq(items) => v.visit_seq(Seq(items.iter())),
            Kind::Map(entries) => v.visit_map(Map {
                entries: entries.iter(),
                value: None,
            }),
        }
    }

    /// Any scalar can be read as text, as written (`prefix: 123` is "123").
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            Kind::Scalar(Scalar::Null, _) => self.deserialize_any(v),
            Kind::Scalar(_, raw) => v.visit_str(raw),
            _ => self.deserialize_any(v),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        if self.is_null() {
            v.visit_none()
        } else {
            v.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    /// An empty value is an empty list (`operators:`).
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        if self.is_null() {
            v.visit_seq(Seq([].iter()))
        } else {
            self.deserialize_any(v)
        }
    }

    /// An empty value is an empty mapping (`stdout:`, `checkpointing:`).
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        if self.is_null() {
            De(&EMPTY_MAP).deserialize_any(v)
        } else {
            self.deserialize_any(v)
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(v)
    }

    /// `kind: {settings}` (one key), or just `kind` when it needs no settings.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let problem = match &self.0.kind {
            Kind::Map(entries) if entries.len() == 1 => {
                return v.visit_enum(Enum {
                    variant: &entries[0].key,
                    value: Some(&entries[0].value),
                });
            }
            Kind::Scalar(Scalar::Null, _) => "nothing".to_string(),
            Kind::Scalar(_, raw) => {
                return v.visit_enum(Enum {
                    variant: raw,
                    value: None,
                });
            }
            Kind::Map(entries) if entries.is_empty() => "an empty mapping".to_string(),
            Kind::Map(entries) => format!(
                "{} keys ({})",
                entries.len(),
                entries
                    .iter()
                    .map(|e| e.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Kind::Seq(_) => "a list".to_string(),
        };
        let first = variants.first().copied().unwrap_or("kind");
        Err(de::Error::custom(format!(
            "expected exactly one of: {} (e.g. '{first}: {{...}}'), found {problem}",
            variants.join(", ")
        )))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct tuple tuple_struct
    }
}

struct Seq<'a>(std::slice::Iter<'a, Node>);

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        self.0.next().map(|n| seed.deserialize(De(n))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Map<'a> {
    entries: std::slice::Iter<'a, Entry>,
    value: Option<&'a Node>,
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(e) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(&e.value);
        seed.deserialize(e.key.as_str().into_deserializer())
            .map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, DeError> {
        match self.value.take() {
            Some(n) => seed.deserialize(De(n)),
            None => Err(de::Error::custom("a value was read before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct Enum<'a> {
    variant: &'a str,
    /// `None` when only the kind was written (`sink: stdout`).
    value: Option<&'a Node>,
}

impl<'de, 'a> EnumAccess<'de> for Enum<'a> {
    type Error = DeError;
    type Variant = Enum<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let v = seed.deserialize(self.variant.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Enum<'_> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        match self.value.map(|n| &n.kind) {
            None | Some(Kind::Scalar(Scalar::Null, _)) => Ok(()),
            Some(Kind::Map(e)) if e.is_empty() => Ok(()),
            Some(_) => Err(de::Error::custom(format!(
                "'{}' takes no settings; write just '{}'",
                self.variant, self.variant
            ))),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(De(self.value.unwrap_or(&NULL)))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(De(self.value.unwrap_or(&NULL)), v)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(De(self.value.unwrap_or(&NULL)), v)
    }
}

//! The spec document as a tree of YAML nodes that remember where they were
//! written, and the field paths that address them.
//!
//! Invariant: every node and every mapping key carries its 1-based line and
//! column in the submitted text; a path that does not (fully) exist in the
//! tree still locates its nearest existing ancestor.

use std::fmt;

/// A 1-based line and column in the submitted text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };

    pub(crate) fn of(span: &saphyr_parser::Span) -> Pos {
        Pos {
            line: span.start.line().max(1),
            column: span.start.col() + 1,
        }
    }
}

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// A field path from the document root.
pub(crate) type Path = Vec<Seg>;

/// Renders a path as `spec.operators[1].key_by`.
pub(crate) fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => {
                use fmt::Write;
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

/// `a` is `b` or one of its ancestors.
pub(crate) fn is_prefix(a: &[Seg], b: &[Seg]) -> bool {
    a.len() <= b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// A resolved scalar value (YAML 1.2 core schema).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Scalar {
    Null,
    Bool(bool),
    UInt(u64),
    Int(i64),
    Float(f64),
    /// An integer too large for 64 bits.
    BigInt,
    Str,
}

#[derive(Clone, Debug)]
pub(crate) enum Kind {
    /// The resolved value and the text as written (unquoted).
    Scalar(Scalar, String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

impl Node {
    /// Number of nodes in this subtree.
    pub fn size(&self) -> usize {
        match &self.kind {
            Kind::Scalar(..) => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => 1 + entries.iter().map(|e| 1 + e.value.size()).sum::<usize>(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|e| e.key == key).map(|e| &e.value),
            _ => None,
        }
    }

    pub fn entry(&self, key: &str) -> Option<&Entry> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    pub fn is_collection(&self) -> bool {
        !matches!(self.kind, Kind::Scalar(..))
    }

    /// The node at `path`, if it exists.
    pub fn at(&self, path: &[Seg]) -> Option<&Node> {
        let mut node = self;
        for seg in path {
            node = node.child(seg)?;
        }
        Some(node)
    }

    fn child(&self, seg: &Seg) -> Option<&Node> {
        match (seg, &self.kind) {
            (Seg::Key(k), Kind::Map(_)) => self.get(k),
            (Seg::Index(i), Kind::Seq(items)) => items.get(*i),
            _ => None,
        }
    }

    fn child_mut(&mut self, seg: &Seg) -> Option<&mut Node> {
        match (seg, &mut self.kind) {
            (Seg::Key(k), Kind::Map(entries)) => entries
                .iter_mut()
                .find(|e| &e.key == k)
                .map(|e| &mut e.value),
            (Seg::Index(i), Kind::Seq(items)) => items.get_mut(*i),
            _ => None,
        }
    }

    /// The node at `path`, mutably.
    pub fn at_mut(&mut self, path: &[Seg]) -> Option<&mut Node> {
        let mut node = self;
        for seg in path {
            node = node.child_mut(seg)?;
        }
        Some(node)
    }

    /// Removes the map entry at `path` (whose last step must be a key).
    pub fn remove(&mut self, path: &[Seg]) -> bool {
        let Some((Seg::Key(k), parent)) = path.split_last() else {
            return false;
        };
        match self.at_mut(parent).map(|p| &mut p.kind) {
            Some(Kind::Map(entries)) => {
                let before = entries.len();
                entries.retain(|e| &e.key != k);
                entries.len() != before
            }
            _ => false,
        }
    }

    /// Sets the map entry `key` of the mapping at `parent` to `value`.
    /// An empty value at `parent` becomes a mapping.
    pub fn insert(&mut self, parent: &[Seg], key: &str, value: Node) -> bool {
        let Some(node) = self.at_mut(parent) else {
            return false;
        };
        if matches!(node.kind, Kind::Scalar(Scalar::Null, _)) {
            node.kind = Kind::Map(Vec::new());
        }
        let Kind::Map(entries) = &mut node.kind else {
            return false;
        };
        entries.retain(|e| e.key != key);
        entries.push(Entry {
            key: key.to_string(),
            key_pos: value.pos,
            value,
        });
        true
    }

    /// How far `path` exists in this tree (its longest existing prefix).
    pub fn existing_len(&self, path: &[Seg]) -> usize {
        let mut node = self;
        for (n, seg) in path.iter().enumerate() {
            match node.child(seg) {
                Some(c) => node = c,
                None => return n,
            }
        }
        path.len()
    }

    /// Where to point for `path`: the node itself, or its nearest existing
    /// ancestor. A mapping entry whose value is a list or mapping is shown at
    /// its key (where the reader sees the name), a scalar at its value.
    pub fn locate(&self, path: &[Seg]) -> Pos {
        let mut node = self;
        let mut pos = self.pos;
        for seg in path {
            match (seg, &node.kind) {
                (Seg::Key(k), Kind::Map(_)) => match node.entry(k) {
                    Some(e) => {
                        pos = if e.value.is_collection() {
                            e.key_pos
                        } else {
                            e.value.pos
                        };
                        node = &e.value;
                    }
                    None => break,
                },
                (Seg::Index(i), Kind::Seq(items)) => match items.get(*i) {
                    Some(c) => {
                        pos = c.pos;
                        node = c;
                    }
                    None => break,
                },
                _ => break,
            }
        }
        pos
    }

    /// Position of the key `key` of the mapping at `parent`, if it exists.
    pub fn key_pos(&self, parent: &[Seg], key: &str) -> Option<Pos> {
        self.at(parent)?.entry(key).map(|e| e.key_pos)
    }

    /// Splits a dotted path such as `spec.source.generator.fields.user.min`
    /// into steps, guided by the keys of this tree so that keys containing
    /// `.` or `[` still resolve; the part that does not exist is split at
    /// every `.` and `[i]`.
    pub fn parse_path(&self, text: &str) -> Path {
        let mut path = Vec::new();
        let mut node = Some(self);
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('[')
                && let Some((digits, tail)) = after.split_once(']')
                && let Ok(i) = digits.parse::<usize>()
            {
                path.push(Seg::Index(i));
                node = node.and_then(|n| n.child(&Seg::Index(i)));
                rest = tail.strip_prefix('.').unwrap_or(tail);
                continue;
            }
            let known = match node.map(|n| &n.kind) {
                Some(Kind::Map(entries)) => entries
                    .iter()
                    .filter(|e| {
                        rest.strip_prefix(e.key.as_str()).is_some_and(|t| {
                            t.is_empty() || t.starts_with('.') || t.starts_with('[')
                        })
                    })
                    .max_by_key(|e| e.key.len())
                    .map(|e| e.key.len()),
                _ => None,
            };
            let len = known.unwrap_or_else(|| rest.find(['.', '[']).unwrap_or(rest.len()));
            let key = &rest[..len];
            node = node.and_then(|n| n.get(key));
            path.push(Seg::Key(key.to_string()));
            let tail = &rest[len..];
            rest = tail.strip_prefix('.').unwrap_or(tail);
        }
        path
    }
}

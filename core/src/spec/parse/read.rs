//! Reading spec text into a [`Node`] tree with the events of
//! `saphyr-parser` (JSON is YAML, so both formats come through here), and
//! resolving plain scalars by the YAML 1.2 core schema.
//!
//! Invariant: a tree that is read is at most [`MAX_DEPTH`] levels deep and
//! [`MAX_NODES`] nodes large, aliases included, so walking it cannot overflow
//! the stack or exhaust memory.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Tag};

use super::tree::{Entry, Kind, Node, Path, Pos, Scalar, Seg};

/// Deepest nesting of mappings and lists a spec may use.
pub(crate) const MAX_DEPTH: usize = 64;
/// Most nodes a spec may expand to (guards against alias bombs).
pub(crate) const MAX_NODES: usize = 200_000;

/// A problem found while reading the document.
#[derive(Clone, Debug)]
pub(crate) struct TreeProblem {
    pub path: Path,
    pub pos: Pos,
    pub message: String,
}

/// The outcome of reading a document: a tree and the problems that did not
/// stop reading (duplicate keys, unsupported keys or tags), or the one
/// problem that did (syntax errors, limits).
pub(crate) enum Read {
    Tree(Node, Vec<TreeProblem>),
    Fatal(TreeProblem),
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn resolve_plain(v: &str) -> Scalar {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Scalar::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Scalar::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Scalar::Float(f64::NAN),
        _ => {}
    }
    let digits = v.strip_prefix(['-', '+']).unwrap_or(v);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match v.parse::<i128>() {
            Ok(n) if n >= 0 => u64::try_from(n).map_or(Scalar::BigInt, Scalar::UInt),
            Ok(n) => i64::try_from(n).map_or(Scalar::BigInt, Scalar::Int),
            Err(_) => Scalar::BigInt,
        };
    }
    for (prefix, radix) in [("0x", 16), ("0o", 8)] {
        if let Some(d) = v.strip_prefix(prefix)
            && !d.is_empty()
            && d.chars().all(|c| c.is_digit(radix))
        {
            return u64::from_str_radix(d, radix).map_or(Scalar::BigInt, Scalar::UInt);
        }
    }
    if is_float(digits)
        && let Ok(f) = v.parse::<f64>()
    {
        return Scalar::Float(f);
    }
    Scalar::Str
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, sign already removed.
fn is_float(s: &str) -> bool {
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = all_digits(int)
        && frac.is_none_or(all_digits)
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()));
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exp_ok
}

/// A container being read.
enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        tag: Option<String>,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        tag: Option<String>,
        entries: Vec<Entry>,
        /// Line of each key in `entries`, to find duplicates in constant
        /// time (a linear search made a mapping of n keys cost n²).
        lines: std::collections::HashMap<String, usize>,
        /// The key read, waiting for its value (`None` key: an unusable key
        /// whose value is dropped).
        key: Option<(Option<String>, Pos)>,
    },
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
    root: Option<Node>,
    problems: Vec<TreeProblem>,
}

/// Reads `text` into a tree.
pub(crate) fn read(text: &str) -> Read {
    let mut b = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        nodes: 0,
        root: None,
        problems: Vec::new(),
    };
    let mut documents = 0;
    for event in Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(e) => e,
            Err(e) => {
                let m = e.marker();
                let mut pos = Pos {
                    line: m.line().max(1),
                    column: m.col() + 1,
                };
                let mut message = format!("syntax error: {}", e.info());
                if e.info().contains("tab") {
                    // The scanner reports where the scalar or block began;
                    // point at the tab itself.
                    pos = first_tab_after(text, pos).unwrap_or(pos);
                    message.push_str("; indent with spaces, not tabs");
                }
                return Read::Fatal(TreeProblem {
                    path: b.path(),
                    pos,
                    message,
                });
            }
        };
        let pos = Pos::of(&span);
        let done = match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Read::Fatal(TreeProblem {
                        path: Vec::new(),
                        pos,
                        message: "a second YAML document starts here; a spec file holds \
                                  exactly one job (remove the extra '---' section)"
                            .into(),
                    });
                }
                None
            }
            Event::Scalar(value, style, anchor, tag) => {
                b.scalar(value, style, anchor, tag.as_deref(), pos)
            }
            Event::SequenceStart(anchor, tag) => {
                let tag = b.collection_tag(tag.as_deref(), pos);
                b.open(Frame::Seq {
                    pos,
                    anchor,
                    tag,
                    items: Vec::new(),
                })
            }
            Event::MappingStart(anchor, tag) => {
                let tag = b.collection_tag(tag.as_deref(), pos);
                b.open(Frame::Map {
                    pos,
                    anchor,
                    tag,
                    entries: Vec::new(),
                    lines: Default::default(),
                    key: None,
                })
            }
            Event::SequenceEnd | Event::MappingEnd => b.close(),
            Event::Alias(id) => match b.anchors.get(&id) {
                Some(node) => {
                    let node = node.clone();
                    b.count(node.size()).or_else(|| {
                        b.attach(node);
                        None
                    })
                }
                None => Some(format!("unknown alias (anchor {id} is not defined)")),
            },
            _ => None,
        };
        if let Some(message) = done {
            return Read::Fatal(TreeProblem {
                path: b.path(),
                pos,
                message,
            });
        }
    }
    let root = b.root.unwrap_or(Node {
        pos: Pos::START,
        kind: Kind::Scalar(Scalar::Null, String::new()),
    });
    Read::Tree(root, b.problems)
}

impl Builder {
    /// The path of the node being read, for problems.
    fn path(&self) -> Path {
        let mut path = Vec::new();
        for f in &self.stack {
            match f {
                Frame::Seq { items, .. } => path.push(Seg::Index(items.len())),
                Frame::Map { key, .. } => match key {
                    Some((Some(k), _)) => path.push(Seg::Key(k.clone())),
                    _ => break,
                },
            }
        }
        path
    }

    fn problem(&mut self, pos: Pos, message: String) {
        let path = self.path();
        self.problems.push(TreeProblem { path, pos, message });
    }

    /// The tag of a mapping or list: only local tags (`!generator`) are
    /// kept, as the kind of an enum (how serde_yaml writes enums).
    fn collection_tag(&mut self, tag: Option<&Tag>, pos: Pos) -> Option<String> {
        let tag = tag?;
        if tag.handle == "!" && !tag.suffix.is_empty() {
            return Some(tag.suffix.clone());
        }
        if !tag.is_yaml_core_schema() {
            self.problem(pos, format!("unsupported tag '{tag}'; remove it"));
        }
        None
    }

    fn scalar(
        &mut self,
        value: Cow<'_, str>,
        style: ScalarStyle,
        anchor: usize,
        tag: Option<&Tag>,
        pos: Pos,
    ) -> Option<String> {
        let raw = value.into_owned();
        let mut local = None;
        let resolved = match tag {
            Some(t) if t.is_yaml_core_schema() => match t.suffix.as_str() {
                "str" => Scalar::Str,
                "null" | "bool" | "int" | "float" => {
                    let r = resolve_plain(&raw);
                    let fits = match t.suffix.as_str() {
                        "null" => r == Scalar::Null,
                        "bool" => matches!(r, Scalar::Bool(_)),
                        "int" => matches!(r, Scalar::UInt(_) | Scalar::Int(_) | Scalar::BigInt),
                        _ => matches!(r, Scalar::Float(_) | Scalar::UInt(_) | Scalar::Int(_)),
                    };
                    if !fits {
                        self.problem(pos, format!("'{raw}' is not a valid !!{}", t.suffix));
                    }
                    r
                }
                _ => {
                    self.problem(pos, format!("unsupported tag '!!{}'; remove it", t.suffix));
                    Scalar::Str
                }
            },
            Some(t) if t.handle == "!" && !t.suffix.is_empty() => {
                local = Some(t.suffix.clone());
                plain_or_str(&raw, style)
            }
            Some(t) => {
                self.problem(pos, format!("unsupported tag '{t}'; remove it"));
                plain_or_str(&raw, style)
            }
            None => plain_or_str(&raw, style),
        };
        let node = Node {
            pos,
            kind: Kind::Scalar(resolved, raw),
        };
        let node = match local {
            Some(kind) => tagged(kind, node),
            None => node,
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        self.count(1).or_else(|| {
            self.attach(node);
            None
        })
    }

    fn open(&mut self, frame: Frame) -> Option<String> {
        if let Some(m) = self.count(1) {
            return Some(m);
        }
        if self.stack.len() >= MAX_DEPTH {
            return Some(format!(
                "nested more than {MAX_DEPTH} levels deep; a job spec never needs this"
            ));
        }
        self.stack.push(frame);
        None
    }

    fn close(&mut self) -> Option<String> {
        let (node, anchor, tag) = match self.stack.pop()? {
            Frame::Seq {
                pos,
                anchor,
                tag,
                items,
            } => (
                Node {
                    pos,
                    kind: Kind::Seq(items),
                },
                anchor,
                tag,
            ),
            Frame::Map {
                pos,
                anchor,
                tag,
                entries,
                ..
            } => (
                Node {
                    pos,
                    kind: Kind::Map(entries),
                },
                anchor,
                tag,
            ),
        };
        let node = match tag {
            Some(kind) => tagged(kind, node),
            None => node,
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        self.attach(node);
        None
    }

    /// Counts `n` more nodes against [`MAX_NODES`].
    fn count(&mut self, n: usize) -> Option<String> {
        self.nodes += n;
        (self.nodes > MAX_NODES).then(|| {
            format!(
                "the document expands to more than {MAX_NODES} values (aliases included); \
                 a job spec is far smaller"
            )
        })
    }

    /// Adds a finished node to the container being read (or makes it the root).
    fn attach(&mut self, node: Node) {
        let here = self.path();
        let problem = match self.stack.last_mut() {
            None => {
                self.root.get_or_insert(node);
                None
            }
            Some(Frame::Seq { items, .. }) => {
                items.push(node);
                None
            }
            Some(Frame::Map {
                entries,
                lines,
                key,
                ..
            }) => match key.take() {
                // The node is a key.
                None => match node.kind {
                    Kind::Scalar(_, raw) => {
                        *key = Some((Some(raw), node.pos));
                        None
                    }
                    _ => {
                        *key = Some((None, node.pos));
                        Some((
                            node.pos,
                            "a key must be a plain name, not a list or mapping".into(),
                        ))
                    }
                },
                // The value of an unusable key: dropped.
                Some((None, _)) => None,
                Some((Some(k), key_pos)) => match lines.get(&k) {
                    Some(first) => Some((
                        key_pos,
                        format!("duplicate key '{k}' (first set on line {first}); keep only one"),
                    )),
                    None => {
                        lines.insert(k.clone(), key_pos.line);
                        entries.push(Entry {
                            key: k,
                            key_pos,
                            value: node,
                        });
                        None
                    }
                },
            },
        };
        if let Some((pos, message)) = problem {
            self.problems.push(TreeProblem {
                path: here,
                pos,
                message,
            });
        }
    }
}

/// The position of the first tab at or after `from`.
fn first_tab_after(text: &str, from: Pos) -> Option<Pos> {
    let mut pos = Pos::START;
    for c in text.chars() {
        if c == '\t' && pos >= from {
            return Some(pos);
        }
        if c == '\n' {
            pos.line += 1;
            pos.column = 1;
        } else {
            pos.column += 1;
        }
    }
    None
}

fn plain_or_str(raw: &str, style: ScalarStyle) -> Scalar {
    if style == ScalarStyle::Plain {
        resolve_plain(raw)
    } else {
        Scalar::Str
    }
}

/// `!kind value` is the one-key mapping `{kind: value}`.
fn tagged(kind: String, node: Node) -> Node {
    Node {
        pos: node.pos,
        kind: Kind::Map(vec![Entry {
            key: kind,
            key_pos: node.pos,
            value: node,
        }]),
    }
}

//! From file text to a tree of YAML nodes that remember where they were written.
//!
//! A file is cut into documents at `---` / `...` lines (YAML forbids those markers inside any
//! scalar or collection, so the cut is exact), and each document is parsed on its own, so that a
//! syntax error in one document does not hide the problems of the next. The tree keeps every
//! node's line and column in file coordinates; decoding into typed resources happens elsewhere.
//! This module must never panic on any input and never let the YAML library's types escape it.

use std::ops::Range;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter, Spanned};

use super::error::{ErrorKind, ValidationError};
use super::resources::Position;

/// One YAML node and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Position,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// How this value is described in "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "null".to_owned(),
            Value::Bool(b) => format!("boolean `{b}`"),
            Value::Int(i) => format!("integer `{i}`"),
            Value::Float(x) => format!("number `{x:?}`"),
            Value::Str(s) => format!("string {}", quote(s)),
            Value::Seq(_) => "a list".to_owned(),
            Value::Map(_) => "a mapping".to_owned(),
        }
    }
}

/// Quotes a user-supplied string for a message, shortening very long ones and escaping control
/// characters so a message stays on one line.
pub(crate) fn quote(s: &str) -> String {
    const MAX: usize = 64;
    let mut shown: String = s.chars().take(MAX).collect();
    if shown.len() < s.len() {
        shown.push('…');
    }
    format!("{:?}", shown)
}

/// One `---`-separated document of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DocumentText<'a> {
    pub text: &'a str,
    /// The document's bytes in the file, including its `---` line.
    pub byte_range: Range<usize>,
    /// 1-based line of the document's first byte in the file.
    pub first_line: usize,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Cuts `text` into documents. A `---` line starts a document (unless only directives precede it
/// in the current one); a `...` line ends one. Empty documents are kept here and dropped by the
/// caller after parsing, so that "empty" is decided by the YAML parser, not by guesswork.
pub(crate) fn split_documents(text: &str) -> Vec<DocumentText<'_>> {
    let bom = if text.starts_with('\u{feff}') { 3 } else { 0 };
    let mut documents = Vec::new();
    let mut start = bom;
    let mut start_line = 1;
    let mut offset = bom;
    let mut line_number = 1;
    // Whether the current document has seen only blank, comment and directive lines, and whether
    // one of them was a directive (which belongs to the document that the next `---` starts).
    let mut only_preamble = true;
    let mut has_directive = false;

    let mut push = |range: Range<usize>, first_line: usize| {
        if let Some(slice) = text.get(range.clone()) {
            documents.push(DocumentText {
                text: slice,
                byte_range: range,
                first_line,
            });
        }
    };

    for line in text.get(bom..).unwrap_or_default().split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if is_marker(content, "---") && offset > start && !(only_preamble && has_directive) {
            push(start..offset, start_line);
            start = offset;
            start_line = line_number;
            only_preamble = true;
            has_directive = false;
        }
        let trimmed = content.trim_start();
        if content.starts_with('%') {
            has_directive = true;
        } else if !(trimmed.is_empty() || trimmed.starts_with('#')) {
            only_preamble = false;
        }
        offset += line.len();
        line_number += 1;
        if is_marker(content, "...") {
            push(start..offset, start_line);
            start = offset;
            start_line = line_number;
            only_preamble = true;
            has_directive = false;
        }
    }
    if start < text.len() {
        push(start..text.len(), start_line);
    }
    documents
}

/// Limits for one document. Mesh resources are small; these stop alias bombs ("billion laughs"),
/// deep nesting and oversized documents long before they cost real memory or stack.
fn parser_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 200_000,
            max_nodes: 100_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 48,
            max_documents: 1,
            max_total_scalar_bytes: 4 * 1024 * 1024,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 50_000,
            max_replay_stack_depth: 16,
        },
        // YAML 1.2 booleans only: `no`, `on`, `y` stay strings (the "Norway problem").
        strict_booleans: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
        with_snippet: false,
        crop_radius: 0,
    }
}

/// Parses one document into a node tree in file coordinates.
pub(crate) fn parse_document(
    file: &Path,
    document: &DocumentText<'_>,
) -> Result<Node, ValidationError> {
    let line_offset = document.first_line.saturating_sub(1);
    let fallback = Position {
        line: document.first_line,
        column: 1,
    };
    match serde_saphyr::from_str_with_options::<Spanned<Raw>>(document.text, parser_options()) {
        Ok(raw) => Ok(raw.into_node(line_offset, fallback)),
        Err(error) => Err(syntax_error(file, &error, line_offset, fallback)),
    }
}

fn syntax_error(
    file: &Path,
    error: &serde_saphyr::Error,
    line_offset: usize,
    fallback: Position,
) -> ValidationError {
    let position = error
        .location()
        .map(|l| to_position(l, line_offset, fallback))
        .unwrap_or(fallback);
    // The formatter wants the original error, not its wrappers; and its text has no position
    // (ours is in file coordinates, the library's would be relative to the document).
    let mut inner = error.without_snippet();
    if let serde_saphyr::Error::AliasError { error, .. } = inner {
        inner = error.without_snippet();
    }
    let message = serde_saphyr::DefaultMessageFormatter.format_message(inner);
    let message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let over_limit = matches!(
        inner,
        serde_saphyr::Error::Budget { .. }
            | serde_saphyr::Error::AliasReplayLimitExceeded { .. }
            | serde_saphyr::Error::AliasExpansionLimitExceeded { .. }
            | serde_saphyr::Error::AliasReplayStackDepthExceeded { .. }
    );
    let reason = if over_limit {
        format!(
            "document is too large, too deeply nested or expands too many aliases for a mesh resource ({message})"
        )
    } else {
        message
    };
    ValidationError::new(file, position, "", ErrorKind::Syntax, reason)
}

fn to_position(
    location: serde_saphyr::Location,
    line_offset: usize,
    fallback: Position,
) -> Position {
    let line = usize::try_from(location.line()).unwrap_or(0);
    let column = usize::try_from(location.column()).unwrap_or(0);
    if line == 0 || column == 0 {
        fallback
    } else {
        Position {
            line: line.saturating_add(line_offset),
            column,
        }
    }
}

/// The shape serde-saphyr fills in; converted to [`Node`] right away.
enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<Raw>, Spanned<Raw>)>),
}

trait IntoNode {
    fn into_node(self, line_offset: usize, fallback: Position) -> Node;
}

impl IntoNode for Spanned<Raw> {
    fn into_node(self, line_offset: usize, fallback: Position) -> Node {
        let pos = to_position(self.referenced, line_offset, fallback);
        let value = match self.value {
            Raw::Null => Value::Null,
            Raw::Bool(b) => Value::Bool(b),
            Raw::Int(i) => Value::Int(i),
            Raw::Float(x) => Value::Float(x),
            Raw::Str(s) => Value::Str(s),
            Raw::Seq(items) => Value::Seq(
                items
                    .into_iter()
                    .map(|item| item.into_node(line_offset, pos))
                    .collect(),
            ),
            Raw::Map(entries) => Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| {
                        let key = k.into_node(line_offset, pos);
                        let key_pos = key.pos;
                        (key, v.into_node(line_offset, key_pos))
                    })
                    .collect(),
            ),
        };
        Node { pos, value }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        Raw::deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
        Ok(i128::try_from(v).map_or(Raw::Float(v as f64), Raw::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        match std::str::from_utf8(v) {
            Ok(s) => Ok(Raw::Str(s.to_owned())),
            Err(_) => Err(E::custom("binary values are not supported")),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(key) = map.next_key()? {
            let value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Raw::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(text: &str) -> Vec<(&str, usize)> {
        split_documents(text)
            .into_iter()
            .map(|d| (d.text, d.first_line))
            .collect()
    }

    #[test]
    fn splits_on_markers_and_keeps_lines() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n...\nd: 4\n";
        assert_eq!(
            cut(text),
            vec![
                ("a: 1\n", 1),
                ("---\nb: 2\n", 2),
                ("--- # c\nc: 3\n...\n", 4),
                ("d: 4\n", 7)
            ]
        );
    }

    #[test]
    fn dashes_inside_values_do_not_split() {
        let text = "a: |\n  ---\n  x\nb: ---x\n----\n";
        assert_eq!(cut(text).len(), 1);
    }

    #[test]
    fn directives_stay_with_their_document() {
        let text = "%YAML 1.2\n---\na: 1\n";
        assert_eq!(cut(text), vec![("%YAML 1.2\n---\na: 1\n", 1)]);
    }

    #[test]
    fn byte_ranges_cover_the_file() {
        let text = "\u{feff}a: 1\r\n---\r\nb: 2";
        let docs = split_documents(text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].byte_range, 3..9);
        assert_eq!(docs[1].byte_range, 9..text.len());
        assert_eq!(docs[1].first_line, 2);
    }

    #[test]
    fn positions_are_in_file_coordinates() {
        let text = "a: 1\n---\nkind: x\nspec:\n  port: 80\n";
        let docs = split_documents(text);
        let node = parse_document(Path::new("f.yaml"), &docs[1]).unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map: {node:?}")
        };
        let (key, value) = &entries[1];
        assert_eq!(key.pos, Position { line: 4, column: 1 });
        let Value::Map(inner) = &value.value else {
            panic!("not a map")
        };
        assert_eq!(inner[0].1.pos, Position { line: 5, column: 9 });
        assert_eq!(inner[0].1.value, Value::Int(80));
    }

    #[test]
    fn syntax_errors_are_in_file_coordinates() {
        let text = "a: 1\n---\nb: {c: 1\n";
        let docs = split_documents(text);
        let error = parse_document(Path::new("f.yaml"), &docs[1]).unwrap_err();
        assert_eq!((error.line, error.column), (3, 4));
        assert_eq!(error.kind, ErrorKind::Syntax);
        assert!(!error.reason.contains("line"), "{}", error.reason);
    }
}

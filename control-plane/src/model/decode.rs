//! The small vocabulary the resource decoders are written in: views of YAML mappings that
//! reject unknown keys, and typed readers for strings, numbers, ports, durations, addresses,
//! networks, regexes, enums and Kubernetes names.
//!
//! Every reader records a [`ValidationError`] at the offending token and returns `None` instead of
//! stopping, so one pass over a document reports all of its problems. Readers never panic and
//! never accept a value they cannot represent exactly (a port of 70000, a float where an integer
//! is expected, a number where a string is expected).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::error::{ErrorKind, ValidationError};
use super::resources::{FieldPositions, Position};
use super::yaml::{Node, Value, quote};

/// Longest regex source accepted, and the most memory its compiled form may take. Routes are
/// evaluated per request, so a pathological pattern is refused here rather than in the proxy.
const MAX_REGEX_LEN: usize = 1024;
const MAX_REGEX_SIZE: usize = 1 << 20;

/// A field path with the node written there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field<'n> {
    pub node: &'n Node,
    path: &'n str,
}

/// A field path and its node, with the path owned (for list items and map values, whose paths do
/// not exist in the document text).
#[derive(Debug, Clone)]
pub(crate) struct Item<'n> {
    pub node: &'n Node,
    pub path: String,
}

impl<'n> Item<'n> {
    pub fn field(&self) -> Field<'_> {
        Field {
            node: self.node,
            path: &self.path,
        }
    }
}

impl<'n> Field<'n> {
    pub fn path(&self) -> &str {
        self.path
    }

    pub fn pos(&self) -> Position {
        self.node.pos
    }
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A mapping whose keys have been checked against the fields a type knows.
pub(crate) struct Fields<'n> {
    pos: Position,
    path: String,
    /// Known keys with non-null values, and the path of each.
    entries: Vec<(&'n str, &'n Node, String)>,
}

impl<'n> Fields<'n> {
    /// The value of `name`; `None` if absent or null (Kubernetes treats null as unset).
    pub fn get(&self, name: &str) -> Option<Field<'_>> {
        self.entries
            .iter()
            .find(|(key, _, _)| *key == name)
            .map(|(_, node, path)| Field { node, path })
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The value of a required field, reporting it missing at the mapping.
    pub fn require(&self, dec: &mut Decoder<'_>, name: &str) -> Option<Field<'_>> {
        let field = self.get(name);
        if field.is_none() {
            dec.error(
                self.pos,
                &join(&self.path, name),
                ErrorKind::MissingField,
                format!("missing required field `{name}`"),
            );
        }
        field
    }

    /// Where the mapping starts.
    pub fn pos(&self) -> Position {
        self.pos
    }

    pub fn path_of(&self, name: &str) -> String {
        join(&self.path, name)
    }
}

/// Collects the errors and field positions of one document while it is decoded.
pub(crate) struct Decoder<'f> {
    file: &'f Path,
    errors: Vec<ValidationError>,
    positions: BTreeMap<String, Position>,
}

impl<'f> Decoder<'f> {
    pub fn new(file: &'f Path) -> Self {
        Self {
            file,
            errors: Vec::new(),
            positions: BTreeMap::new(),
        }
    }

    pub fn into_parts(self) -> (Vec<ValidationError>, FieldPositions) {
        (self.errors, FieldPositions::new(self.positions))
    }

    pub fn error(
        &mut self,
        pos: Position,
        field: &str,
        kind: ErrorKind,
        reason: impl Into<String>,
    ) {
        self.errors
            .push(ValidationError::new(self.file, pos, field, kind, reason));
    }

    /// A value of the right type that is not acceptable.
    pub fn invalid(&mut self, field: Field<'_>, reason: impl Into<String>) {
        self.error(field.pos(), field.path, ErrorKind::InvalidValue, reason);
    }

    pub fn wrong_type(&mut self, field: Field<'_>, expected: &str) {
        let reason = format!("expected {expected}, found {}", field.node.value.describe());
        self.error(field.pos(), field.path, ErrorKind::WrongType, reason);
    }

    /// Views `node` as a mapping that may only contain `known` keys. Unknown keys are reported at
    /// the key; the known ones are returned even then, so their values are still checked.
    pub fn fields<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(map) = &node.value else {
            self.wrong_type(Field { node, path }, "a mapping");
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let Value::Str(name) = &key.value else {
                let reason = format!(
                    "mapping keys must be strings, found {}",
                    key.value.describe()
                );
                self.error(key.pos, path, ErrorKind::WrongType, reason);
                continue;
            };
            let field_path = join(path, name);
            if !known.contains(&name.as_str()) {
                let reason = match suggest(name, known) {
                    Some(s) => format!("unknown field `{name}`; did you mean `{s}`?"),
                    None if known.is_empty() => format!("unknown field `{name}`"),
                    None => format!(
                        "unknown field `{name}`; expected one of: {}",
                        known.join(", ")
                    ),
                };
                self.error(key.pos, &field_path, ErrorKind::UnknownField, reason);
                continue;
            }
            self.positions.insert(field_path.clone(), value.pos);
            if value.value != Value::Null {
                entries.push((name.as_str(), value, field_path));
            }
        }
        Some(Fields {
            pos: node.pos,
            path: path.to_owned(),
            entries,
        })
    }

    /// The items of a list, each with its indexed path. `null` is an empty list.
    pub fn list<'n>(&mut self, field: Field<'n>) -> Option<Vec<Item<'n>>> {
        match &field.node.value {
            Value::Seq(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, node)| {
                        let path = format!("{}[{i}]", field.path);
                        self.positions.insert(path.clone(), node.pos);
                        Item { node, path }
                    })
                    .collect(),
            ),
            Value::Null => Some(Vec::new()),
            _ => {
                self.wrong_type(field, "a list");
                None
            }
        }
    }

    /// Decodes every item of a list with `decode`, keeping the ones that decode.
    pub fn list_of<'n, T>(
        &mut self,
        field: Field<'n>,
        mut decode: impl FnMut(&mut Self, Field<'_>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = self.list(field)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in &items {
            match decode(self, item.field()) {
                Some(value) => out.push(value),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A mapping from string keys to values, with each key's position and each value's path.
    pub fn entries<'n>(&mut self, field: Field<'n>) -> Option<Vec<(String, Position, Item<'n>)>> {
        let map = match &field.node.value {
            Value::Map(map) => map,
            Value::Null => return Some(Vec::new()),
            _ => {
                self.wrong_type(field, "a mapping");
                return None;
            }
        };
        let mut out = Vec::with_capacity(map.len());
        let mut ok = true;
        for (key, value) in map {
            let Value::Str(name) = &key.value else {
                let reason = format!(
                    "mapping keys must be strings, found {}",
                    key.value.describe()
                );
                self.error(key.pos, field.path, ErrorKind::WrongType, reason);
                ok = false;
                continue;
            };
            let path = format!("{}[{}]", field.path, quote(name));
            self.positions.insert(path.clone(), value.pos);
            out.push((name.clone(), key.pos, Item { node: value, path }));
        }
        ok.then_some(out)
    }

    pub fn string(&mut self, field: Field<'_>) -> Option<String> {
        match &field.node.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => {
                self.wrong_type(field, "a string (quote the value)");
                None
            }
            _ => {
                self.wrong_type(field, "a string");
                None
            }
        }
    }

    /// A string that must pass `check` (which explains what is wrong).
    pub fn checked_string(
        &mut self,
        field: Field<'_>,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Option<String> {
        let s = self.string(field)?;
        match check(&s) {
            Ok(()) => Some(s),
            Err(reason) => {
                self.invalid(field, reason);
                None
            }
        }
    }

    /// A string parsed by `parse` (whose error explains what is wrong).
    pub fn parsed<T>(
        &mut self,
        field: Field<'_>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(field)?;
        match parse(&s) {
            Ok(value) => Some(value),
            Err(reason) => {
                self.invalid(field, reason);
                None
            }
        }
    }

    pub fn bool(&mut self, field: Field<'_>) -> Option<bool> {
        match field.node.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.wrong_type(field, "`true` or `false`");
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn integer<T>(&mut self, field: Field<'_>, min: T, max: T) -> Option<T>
    where
        T: TryFrom<i128> + Into<i128> + Copy + std::fmt::Display,
    {
        let Value::Int(i) = field.node.value else {
            self.wrong_type(field, &format!("an integer between {min} and {max}"));
            return None;
        };
        match T::try_from(i) {
            Ok(value) if i >= min.into() && i <= max.into() => Some(value),
            _ => {
                self.invalid(field, format!("must be between {min} and {max}, got {i}"));
                None
            }
        }
    }

    pub fn port(&mut self, field: Field<'_>) -> Option<u16> {
        let Value::Int(i) = field.node.value else {
            self.wrong_type(field, "a port number between 1 and 65535");
            return None;
        };
        match u16::try_from(i) {
            Ok(port) if port >= 1 => Some(port),
            _ => {
                self.invalid(field, format!("port must be between 1 and 65535, got {i}"));
                None
            }
        }
    }

    /// A percentage, 0..=100.
    pub fn percent(&mut self, field: Field<'_>) -> Option<u8> {
        self.integer(field, 0u8, 100u8)
    }

    /// A positive duration written as `100ms`, `5s`, `1m30s`, `1h`, at most `max` (one of the
    /// ceilings of [`keel_proto::limits`], which proxies enforce too).
    pub fn duration(&mut self, field: Field<'_>, max: Duration) -> Option<Duration> {
        let expected = "a duration such as `100ms`, `5s` or `1m`";
        let Value::Str(text) = &field.node.value else {
            self.wrong_type(field, expected);
            return None;
        };
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.invalid(
                    field,
                    "duration must be greater than zero (omit the field for the default)",
                );
                None
            }
            Ok(d) if d > max => {
                self.invalid(
                    field,
                    format!(
                        "duration {} is longer than the most this field allows, {}",
                        quote(text),
                        humantime::format_duration(max)
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.invalid(field, format!("invalid duration {}: {e}", quote(text)));
                None
            }
        }
    }

    pub fn ip(&mut self, field: Field<'_>) -> Option<IpAddr> {
        self.parsed(field, |s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("{} is not an IPv4 or IPv6 address", quote(s)))
        })
    }

    /// A network in CIDR form, or a bare address meaning that one host. Host bits must be zero.
    pub fn cidr(&mut self, field: Field<'_>) -> Option<IpNet> {
        self.parsed(field, parse_cidr)
    }

    /// A regular expression (RE2-like syntax of the `regex` crate), kept as its source text.
    pub fn regex(&mut self, field: Field<'_>) -> Option<String> {
        self.parsed(field, |s| {
            if s.len() > MAX_REGEX_LEN {
                return Err(format!("regex is longer than {MAX_REGEX_LEN} bytes"));
            }
            regex::RegexBuilder::new(s)
                .size_limit(MAX_REGEX_SIZE)
                .build()
                .map(|_| s.to_owned())
                .map_err(|e| {
                    // The parser's message spans lines (pattern, caret, cause); keep the cause.
                    let text = e.to_string();
                    let cause = text
                        .lines()
                        .rev()
                        .find_map(|line| line.trim().strip_prefix("error: "))
                        .unwrap_or(text.trim());
                    format!("invalid regex {}: {cause}", quote(s))
                })
        })
    }

    /// One of a fixed set of spellings.
    pub fn one_of<T: Copy>(&mut self, field: Field<'_>, choices: &[(&str, T)]) -> Option<T> {
        let s = self.string(field)?;
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == s) {
            return Some(*value);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let reason = match names.iter().find(|name| name.eq_ignore_ascii_case(&s)) {
            Some(name) => format!("unknown value {}; did you mean `{name}`?", quote(&s)),
            None => format!(
                "unknown value {}; expected one of: {}",
                quote(&s),
                names.join(", ")
            ),
        };
        self.invalid(field, reason);
        None
    }

    /// A label map: Kubernetes label keys and values.
    pub fn labels(&mut self, field: Field<'_>) -> Option<BTreeMap<String, String>> {
        self.string_map(field, check_label_key, check_label_value)
    }

    /// A string-to-string mapping whose keys and values pass the given checks.
    pub fn string_map(
        &mut self,
        field: Field<'_>,
        check_key: impl Fn(&str) -> Result<(), String>,
        check_value: impl Fn(&str) -> Result<(), String>,
    ) -> Option<BTreeMap<String, String>> {
        let entries = self.entries(field)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, key_pos, item) in entries {
            if let Err(reason) = check_key(&key) {
                self.error(key_pos, &item.path, ErrorKind::InvalidValue, reason);
                ok = false;
            }
            match self.checked_string(item.field(), &check_value) {
                Some(value) => {
                    out.insert(key, value);
                }
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

/// The closest known field to a misspelt one: same letters ignoring case and `_`/`-`, or within
/// two edits.
fn suggest<'k>(unknown: &str, known: &[&'k str]) -> Option<&'k str> {
    let normalize = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let wanted = normalize(unknown);
    if let Some(k) = known.iter().find(|k| normalize(k) == wanted) {
        return Some(k);
    }
    if unknown.chars().count() < 4 {
        return None;
    }
    known
        .iter()
        .map(|k| (edit_distance(&wanted, &normalize(k)), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if !s.contains('/') {
        return s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{} is not an IP address or CIDR block", quote(s)));
    }
    let net: IpNet = s.parse().map_err(|_| {
        format!(
            "{} is not a valid CIDR block (address/prefix-length)",
            quote(s)
        )
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{} has host bits set; did you mean {}?",
            quote(s),
            net.trunc()
        ));
    }
    Ok(net)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes names. These mirror apimachinery's validation so a file that keel accepts is one the
// API server accepts too.

/// RFC 1123 label: what namespaces and most names inside a DNS name must be.
pub(crate) fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > 63 {
        return Err(format!("{} is longer than 63 characters", quote(s)));
    }
    let bytes = s.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ends_ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
    if inner_ok && ends_ok {
        Ok(())
    } else {
        Err(format!(
            "{} must consist of lower case letters, digits and '-', and start and end with a letter or digit",
            quote(s)
        ))
    }
}

/// RFC 1035 label: an RFC 1123 label that starts with a letter (Kubernetes Service names).
pub(crate) fn check_service_name(s: &str) -> Result<(), String> {
    check_dns_label(s)?;
    if s.as_bytes().first().is_some_and(u8::is_ascii_lowercase) {
        Ok(())
    } else {
        Err(format!("{} must start with a lower case letter", quote(s)))
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err(format!("{} is longer than 253 characters", quote(s)));
    }
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    for label in s.split('.') {
        check_dns_label(label).map_err(|_| {
            format!(
                "{} must be lower case letters, digits, '-' and '.', with each dot-separated part starting and ending with a letter or digit",
                quote(s)
            )
        })?;
    }
    Ok(())
}

fn check_qualified_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label or annotation key: `[prefix/]name`, prefix a DNS subdomain, name at most 63
/// characters of letters, digits, `-`, `_`, `.`.
pub(crate) fn check_label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        check_dns_subdomain(prefix).map_err(|e| format!("label key prefix: {e}"))?;
    }
    if check_qualified_part(name) {
        Ok(())
    } else {
        Err(format!(
            "label key {} must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, optionally after a DNS prefix and '/'",
            quote(s)
        ))
    }
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`, starting and ending with a
/// letter or digit.
pub(crate) fn check_label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || check_qualified_part(s) {
        Ok(())
    } else {
        Err(format!(
            "label value {} must be empty or at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            quote(s)
        ))
    }
}

pub(crate) fn check_any(_: &str) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_dns_label("articles-1").is_ok());
        assert!(check_dns_label("Articles").is_err());
        assert!(check_dns_label("-a").is_err());
        assert!(check_dns_label(&"a".repeat(64)).is_err());
        assert!(check_service_name("1abc").is_err());
        assert!(check_dns_subdomain("a.b-c.d").is_ok());
        assert!(check_dns_subdomain("a..b").is_err());
        assert!(check_label_key("topology.kubernetes.io/zone").is_ok());
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("a/b/c").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_x").is_ok());
        assert!(check_label_value("v1 ").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("10.1.2.3").unwrap(),
            "10.1.2.3/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_cidr("fd00::/8").unwrap(),
            "fd00::/8".parse::<IpNet>().unwrap()
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_cidr("banana").is_err());
    }

    #[test]
    fn suggestions() {
        let known = ["targetPort", "port", "protocol", "name"];
        assert_eq!(suggest("target_port", &known), Some("targetPort"));
        assert_eq!(suggest("protocl", &known), Some("protocol"));
        assert_eq!(suggest("xyzzy", &known), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}

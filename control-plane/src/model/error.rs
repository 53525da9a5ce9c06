//! Validation errors: one per problem, each naming the file, line, column and field it is about.
//!
//! These are the errors a user reads when `keelctl validate` or the file source refuses their
//! YAML, so every one must point at the offending token and say why in plain words. Nothing here
//! may panic or lose an error: collections keep every problem found, not just the first.

use std::fmt;
use std::path::{Path, PathBuf};

use super::resources::Position;

/// What class of problem an error is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The text is not YAML, or exceeds the parser's limits.
    Syntax,
    UnknownField,
    WrongType,
    MissingField,
    UnknownKind,
    UnsupportedApiVersion,
    /// A reference to a resource (or a port of one) that does not exist.
    DanglingReference,
    /// A second resource with the same kind, namespace and name, or a second claim on something
    /// that must be unique (a hostname, an address, a service's traffic policy).
    DuplicateName,
    InvalidValue,
    /// A file or directory could not be read.
    Io,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Syntax => "syntax",
            ErrorKind::UnknownField => "unknown-field",
            ErrorKind::WrongType => "wrong-type",
            ErrorKind::MissingField => "missing-field",
            ErrorKind::UnknownKind => "unknown-kind",
            ErrorKind::UnsupportedApiVersion => "unsupported-api-version",
            ErrorKind::DanglingReference => "dangling-reference",
            ErrorKind::DuplicateName => "duplicate-name",
            ErrorKind::InvalidValue => "invalid-value",
            ErrorKind::Io => "io",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in the mesh YAML.
///
/// `line` and `column` are 1-based (columns count characters). Both are 0 when the problem
/// concerns a whole file (it could not be read); `Display` then leaves them out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{}", Rendered(self))]
pub struct ValidationError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `spec.routes[0].destinations[1].service`; empty if the
    /// problem is not about one field.
    pub field: String,
    pub kind: ErrorKind,
    pub reason: String,
}

impl ValidationError {
    pub fn new(
        file: &Path,
        at: Position,
        field: impl Into<String>,
        kind: ErrorKind,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_path_buf(),
            line: at.line,
            column: at.column,
            field: field.into(),
            kind,
            reason: reason.into(),
        }
    }

    /// An error about a whole file (no position).
    pub fn file(file: &Path, kind: ErrorKind, reason: impl Into<String>) -> Self {
        Self::new(file, Position::default(), "", kind, reason)
    }

    pub fn position(&self) -> Position {
        Position {
            line: self.line,
            column: self.column,
        }
    }
}

struct Rendered<'a>(&'a ValidationError);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        write!(f, "{}", e.file.display())?;
        if e.line > 0 {
            write!(f, ":{}:{}", e.line, e.column)?;
        }
        write!(f, ": {}: ", e.kind)?;
        if !e.field.is_empty() {
            write!(f, "{}: ", e.field)?;
        }
        f.write_str(&e.reason)
    }
}

/// Every problem found, in file order (then line, then column).
#[derive(
    Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, thiserror::Error,
)]
#[serde(transparent)]
#[error("{}", Lines(&self.0))]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl ValidationErrors {
    /// One error about a whole file or directory (it could not be listed or read).
    pub fn single(path: &Path, reason: impl Into<String>) -> Self {
        Self(vec![ValidationError::file(path, ErrorKind::Io, reason)])
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ValidationError> {
        self.0.iter()
    }

    /// Orders errors by file, line and column; errors at the same place keep their order.
    pub(crate) fn sort(&mut self) {
        self.0
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    }
}

impl From<Vec<ValidationError>> for ValidationErrors {
    fn from(errors: Vec<ValidationError>) -> Self {
        Self(errors)
    }
}

impl IntoIterator for ValidationErrors {
    type Item = ValidationError;
    type IntoIter = std::vec::IntoIter<ValidationError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a ValidationError;
    type IntoIter = std::slice::Iter<'a, ValidationError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

struct Lines<'a>(&'a [ValidationError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

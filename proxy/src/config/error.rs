//! Why a discovery response was rejected: which resource, which field, and what is wrong with it.
//!
//! These errors become the message of a NACK, so they are written for the operator reading
//! `keelctl status`: every one names the resource kind and name, and a field path such as
//! `routes[0].match.path.regex`. Nothing here may allocate on the path of a valid resource.

use std::fmt;
use std::net::IpAddr;

use super::ResourceKind;

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("is required but absent")]
    Missing,
    #[error("must not be empty")]
    Empty,
    #[error("must be greater than zero")]
    Zero,
    #[error("{value:?} is not an IP address")]
    BadIp { value: String },
    #[error("{value:?} is neither an IP address nor a CIDR block")]
    BadCidr { value: String },
    #[error("{value} is not a unicast address")]
    NotUnicast { value: IpAddr },
    #[error("{value} is not a port number (1-65535)")]
    BadPort { value: u32 },
    #[error("{value} is not a known {what} value")]
    UnknownEnum { what: &'static str, value: i32 },
    #[error("{value:?} is not a known {what} (expected one of: {expected})")]
    UnknownName {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("regex {pattern:?} does not compile: {}", one_line(.error))]
    BadRegex {
        pattern: String,
        error: regex::Error,
    },
    #[error("{value:?} is not an HTTP method")]
    BadMethod { value: String },
    #[error("{value:?} is not a valid header name")]
    BadHeaderName { value: String },
    #[error("is not a valid duration: {reason}")]
    BadDuration { reason: String },
    #[error("{value} is out of range ({min}-{max})")]
    OutOfRange { value: u64, min: u64, max: u64 },
    #[error("the weights add up to zero")]
    ZeroWeights,
    #[error("the weights add up to {total}, not {expected}")]
    BadTotal { total: u64, expected: u64 },
    #[error("{value:?} appears more than once")]
    Duplicate { value: String },
    #[error("is {found:?}, but the resource is named {expected:?}")]
    NameMismatch { expected: String, found: String },
    #[error("{value:?} is not {expected}")]
    Malformed {
        value: String,
        expected: &'static str,
    },
    #[error("{reason}")]
    Inconsistent { reason: &'static str },
}

/// `regex::Error` spells its diagnostics over several lines; a NACK message is one line.
fn one_line(error: &regex::Error) -> String {
    error
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A [`Problem`] at a field path inside one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub problem: Problem,
}

/// Where in a resource a value sits, built on the stack while validating so that a valid
/// resource costs no allocation; rendered (`routes[0].match.path`) only when something is wrong.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Path<'a> {
    Root,
    Field(&'a Path<'a>, &'static str),
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    pub(crate) fn field(&'a self, name: &'static str) -> Path<'a> {
        Path::Field(self, name)
    }

    pub(crate) fn index(&'a self, index: usize) -> Path<'a> {
        Path::Index(self, index)
    }

    pub(crate) fn error(&self, problem: Problem) -> FieldError {
        FieldError {
            field: self.to_string(),
            problem,
        }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Field(parent, name) => {
                parent.fmt(f)?;
                if !matches!(parent, Path::Root) {
                    f.write_str(".")?;
                }
                f.write_str(name)
            }
            Path::Index(parent, index) => {
                parent.fmt(f)?;
                write!(f, "[{index}]")
            }
        }
    }
}

/// Why a discovery response cannot be applied. The proxy keeps its previous configuration and
/// sends this error's text back in the NACK.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown resource type {type_url:?}")]
    UnknownType { type_url: String },
    #[error("{kind} {name:?}: the resource has no body")]
    MissingBody { kind: ResourceKind, name: String },
    #[error("{kind} {name:?}: the body is a {found:?}, expected {}", .kind.type_url())]
    WrongType {
        kind: ResourceKind,
        name: String,
        found: String,
    },
    #[error("{kind} {name:?}: the body does not decode: {error}")]
    Decode {
        kind: ResourceKind,
        name: String,
        error: prost::DecodeError,
    },
    #[error("{kind} {name:?}: {field}: {problem}")]
    Invalid {
        kind: ResourceKind,
        name: String,
        field: String,
        problem: Problem,
    },
    #[error("{kind} {name:?}: appears more than once in one response")]
    DuplicateResource { kind: ResourceKind, name: String },
    #[error("{kind} {name:?}: both changed and removed in one response")]
    ChangedAndRemoved { kind: ResourceKind, name: String },
    #[error("{kind} {first:?} and {second:?} both claim {what}")]
    Conflict {
        kind: ResourceKind,
        first: String,
        second: String,
        what: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(kind: ResourceKind, name: &str, error: FieldError) -> ConfigError {
        ConfigError::Invalid {
            kind,
            name: name.to_owned(),
            field: error.field,
            problem: error.problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_as_field_paths() {
        let root = Path::Root;
        let routes = root.field("routes");
        let first = routes.index(0);
        let matcher = first.field("match");
        let path = matcher.field("path");
        assert_eq!(path.to_string(), "routes[0].match.path");
        assert_eq!(root.field("service").to_string(), "service");
    }

    #[test]
    fn regex_errors_fit_on_one_line() {
        let pattern = String::from("(");
        let error = regex::Regex::new(&pattern).expect_err("an unclosed group never compiles");
        let problem = Problem::BadRegex { pattern, error };
        assert!(!problem.to_string().contains('\n'), "{problem}");
    }
}

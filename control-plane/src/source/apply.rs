//! `keelctl apply` for the file source: merges applied resources into the watched directory.
//!
//! An apply is validated against the whole state it would produce (the directory as it is on
//! disk, with the applied resources replacing those of the same kind, namespace and name); only
//! a valid state is written. Replaced documents are cut out of the files that held them, and the
//! applied ones are written to `applied/<file name>` in the directory, each file replaced
//! atomically (written aside, then renamed), so the watcher never reads half a file.
//!
//! This module must never leave the directory in a state that failed validation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::{self, Kind, ObjectKey, ValidationErrors};

/// Where applied documents are written, below the watched directory.
pub const APPLIED_DIR: &str = "applied";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the configuration is invalid:\n{0}")]
    Invalid(ValidationErrors),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the applied document names no resource")]
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub kind: String,
    pub name: String,
    pub action: Action,
    /// The file that holds the resource now.
    pub file: PathBuf,
}

/// What an apply did, resource by resource.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyOutcome {
    pub resources: Vec<Applied>,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError {
    let path = path.to_path_buf();
    move |source| ApplyError::Io {
        action,
        path,
        source,
    }
}

/// Applies the YAML `text` (named `input_name` in errors) to the directory `dir`.
pub fn apply(dir: &Path, input_name: &str, text: &str) -> Result<ApplyOutcome, ApplyError> {
    let applied = model::parse_file(Path::new(input_name), text).map_err(ApplyError::Invalid)?;
    if applied.is_empty() {
        return Err(ApplyError::Empty);
    }
    let target = dir.join(APPLIED_DIR).join(applied_file_name(input_name));

    // The directory as it is on disk, file by file, with each file's text.
    let mut texts = BTreeMap::new();
    let mut existing = Vec::new();
    let mut errors = Vec::new();
    for path in model::yaml_files(dir).map_err(ApplyError::Invalid)? {
        let body = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
        match model::parse_file(&path, &body) {
            Ok(resources) => existing.extend(resources),
            Err(e) => errors.extend(e.0),
        }
        texts.insert(path, body);
    }
    if !errors.is_empty() {
        return Err(ApplyError::Invalid(ValidationErrors(errors)));
    }

    let applied_ids: BTreeSet<(Kind, ObjectKey)> =
        applied.iter().map(|r| (r.kind(), r.key())).collect();
    let mut outcome = Vec::new();
    let mut replaced: BTreeMap<PathBuf, Vec<std::ops::Range<usize>>> = BTreeMap::new();
    let mut written = Vec::new();
    let mut candidate = Vec::new();
    for r in existing {
        if !applied_ids.contains(&(r.kind(), r.key())) {
            candidate.push(r);
            continue;
        }
        let new = applied
            .iter()
            .find(|a| a.kind() == r.kind() && a.key() == r.key());
        match new {
            Some(new) if new.same_content(&r) => {
                outcome.push(Applied {
                    kind: r.kind().to_string(),
                    name: r.key().to_string(),
                    action: Action::Unchanged,
                    file: r.origin().file.clone(),
                });
                candidate.push(r);
            }
            _ => {
                replaced
                    .entry(r.origin().file.clone())
                    .or_default()
                    .push(r.origin().byte_range.clone());
                outcome.push(Applied {
                    kind: r.kind().to_string(),
                    name: r.key().to_string(),
                    action: Action::Configured,
                    file: target.clone(),
                });
            }
        }
    }
    for a in &applied {
        let known = outcome
            .iter()
            .any(|o| o.kind == a.kind().to_string() && o.name == a.key().to_string());
        if !known {
            outcome.push(Applied {
                kind: a.kind().to_string(),
                name: a.key().to_string(),
                action: Action::Created,
                file: target.clone(),
            });
        }
        let unchanged = outcome.iter().any(|o| {
            o.action == Action::Unchanged
                && o.kind == a.kind().to_string()
                && o.name == a.key().to_string()
        });
        if !unchanged {
            written.push(a.origin().byte_range.clone());
            candidate.push(a.clone());
        }
    }
    model::Model::from_resources(candidate).map_err(ApplyError::Invalid)?;

    if written.is_empty() {
        return Ok(ApplyOutcome { resources: outcome });
    }
    // The new text of every file the apply touches.
    let mut files: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (path, ranges) in &replaced {
        let old = texts.get(path).map(String::as_str).unwrap_or_default();
        files.insert(path.clone(), cut(old, ranges));
    }
    let mut target_text = files
        .remove(&target)
        .or_else(|| texts.get(&target).cloned())
        .unwrap_or_default();
    for range in written {
        let doc = text.get(range).unwrap_or_default().trim_matches('\n');
        if !target_text.trim().is_empty() && !target_text.ends_with('\n') {
            target_text.push('\n');
        }
        if !target_text.trim().is_empty() {
            target_text.push_str("---\n");
        }
        target_text.push_str(doc);
        target_text.push('\n');
    }
    files.insert(target.clone(), target_text);

    for (path, body) in files {
        let still_has_resources = model::parse_file(&path, &body)
            .map(|r| !r.is_empty())
            .unwrap_or(true);
        if still_has_resources {
            write_atomically(&path, &body)?;
        } else {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
        }
    }
    Ok(ApplyOutcome { resources: outcome })
}

/// `text` without the byte ranges of the documents removed from it.
fn cut(text: &str, ranges: &[std::ops::Range<usize>]) -> String {
    let mut ranges = ranges.to_vec();
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for r in ranges {
        if r.start >= at && r.end <= text.len() {
            out.push_str(text.get(at..r.start).unwrap_or_default());
            at = r.end;
        }
    }
    out.push_str(text.get(at..).unwrap_or_default());
    out
}

/// A safe file name for applied documents from the name the user gave.
fn applied_file_name(input_name: &str) -> String {
    let base = Path::new(input_name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("applied");
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        "applied.yaml".to_owned()
    } else {
        format!("{clean}.yaml")
    }
}

fn write_atomically(path: &Path, body: &str) -> Result<(), ApplyError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // Hidden, so the directory loader never reads it half written.
    let tmp = parent.join(format!(".{name}.keel-apply.tmp"));
    std::fs::write(&tmp, body).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: keel.dev/v1alpha1
kind: Service
metadata:
  name: articles
  namespace: demo
spec:
  ports:
  - name: http
    port: 80
";

    fn service_with_port(port: u16) -> String {
        SERVICE.replace("port: 80", &format!("port: {port}"))
    }

    fn load(dir: &Path) -> model::Model {
        model::load_dir(dir).expect("directory is valid").0
    }

    #[test]
    fn create_then_configure_then_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = apply(dir.path(), "svc.yaml", SERVICE).expect("created");
        assert_eq!(out.resources[0].action, Action::Created);
        assert!(dir.path().join("applied/svc.yaml").exists());

        let out = apply(dir.path(), "svc.yaml", SERVICE).expect("unchanged");
        assert_eq!(out.resources[0].action, Action::Unchanged);

        let out = apply(dir.path(), "other.yaml", &service_with_port(81)).expect("configured");
        assert_eq!(out.resources[0].action, Action::Configured);
        // The resource moved: the old file held only it and is gone.
        assert!(!dir.path().join("applied/svc.yaml").exists());
        let model = load(dir.path());
        assert_eq!(model.services.len(), 1);
    }

    #[test]
    fn replaced_document_is_cut_from_a_multi_document_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = SERVICE.replace("name: articles", "name: comments");
        let both = format!("{SERVICE}---\n{other}");
        std::fs::write(dir.path().join("services.yaml"), &both).expect("write");
        apply(dir.path(), "fix.yaml", &service_with_port(8080)).expect("applied");
        let left = std::fs::read_to_string(dir.path().join("services.yaml")).expect("read");
        assert!(left.contains("comments") && !left.contains("articles"));
        let model = load(dir.path());
        assert_eq!(model.services.len(), 2);
    }

    #[test]
    fn invalid_apply_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("s.yaml"), SERVICE).expect("write");
        let bad = SERVICE.replace("port: 80", "port: 80\n    bogus: 1");
        let err = apply(dir.path(), "bad.yaml", &bad).expect_err("unknown field");
        let ApplyError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(errors.0[0].file, PathBuf::from("bad.yaml"));
        assert!(!dir.path().join(APPLIED_DIR).exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("s.yaml")).expect("read"),
            SERVICE
        );
    }

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(applied_file_name("../../etc/passwd"), "passwd.yaml");
        assert_eq!(applied_file_name("my policy.yaml"), "my-policy.yaml");
        assert_eq!(applied_file_name("-"), "applied.yaml");
    }
}

//! `keelctl apply` for the file source: merges applied resources into the watched directory.
//!
//! An apply is one change, whatever the number of files it brings: every document of every file
//! is validated together against the whole state it would produce (the directory as it is on
//! disk, with the applied resources replacing those of the same kind, namespace and name), and
//! only a valid state is written. Replaced documents are cut out of the files that held them, and
//! the applied ones are written to `applied/<file name>` in the directory. Every file is written
//! aside first (hidden names the loader skips) and renamed into place only when all are written;
//! a file it replaces or removes is first moved aside too, so that if any rename fails the ones
//! done are undone and the directory is as it was. The loader is held meanwhile
//! ([`super::file::DirectoryLoader::apply`]), so no load, the watcher's included, ever reads half
//! an apply.
//!
//! A file of the directory that does not parse blocks an apply (the state it produced would be
//! invalid), except the file the apply writes to: its documents cannot be cut, so it is replaced
//! whole by the applied ones, which is how a broken applied file is repaired with `keelctl apply`.
//!
//! This module must never leave the directory in a state that failed validation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::{
    self, ErrorKind, Kind, ObjectKey, Origin, Resource, ValidationError, ValidationErrors,
};

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
    /// A write failed and so did undoing part of the writes before it.
    #[error(
        "{error}; undoing the apply failed too, so these files are not as they were: {stranded}"
    )]
    PartlyUndone {
        error: Box<ApplyError>,
        stranded: String,
    },
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

/// One file of an apply: its name as the user gave it (errors name it) and its YAML.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ApplyFile {
    pub name: String,
    pub yaml: String,
}

/// An applied resource, with the input it came from and the file it goes to.
struct Incoming {
    resource: Resource,
    input: usize,
    target: PathBuf,
}

/// Applies `files` to the directory `dir` as one change: every document of every file is
/// validated together against the state they produce, and either all of them are written or
/// none. The caller keeps the directory's readers out while this runs
/// ([`super::file::DirectoryLoader::apply`]), so that nobody reads half of it.
pub fn apply(dir: &Path, files: &[ApplyFile]) -> Result<ApplyOutcome, ApplyError> {
    let mut incoming: Vec<Incoming> = Vec::new();
    let mut errors = Vec::new();
    for (input, file) in files.iter().enumerate() {
        match model::parse_file(Path::new(&file.name), &file.yaml) {
            Ok(resources) => {
                let target = dir.join(APPLIED_DIR).join(applied_file_name(&file.name));
                incoming.extend(resources.into_iter().map(|resource| Incoming {
                    resource,
                    input,
                    target: target.clone(),
                }));
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(ApplyError::Invalid(ValidationErrors(errors)));
    }
    if incoming.is_empty() {
        return Err(ApplyError::Empty);
    }
    // One resource applied twice (two files of the same apply) is ambiguous.
    let mut first_of: BTreeMap<(Kind, ObjectKey), &Origin> = BTreeMap::new();
    for i in &incoming {
        let origin = i.resource.origin();
        if let Some(first) = first_of.insert((i.resource.kind(), i.resource.key()), origin) {
            let at = first.position_of("metadata.name");
            errors.push(ValidationError::new(
                &origin.file,
                origin.position_of("metadata.name"),
                "metadata.name",
                ErrorKind::DuplicateName,
                format!(
                    "{} {} is also applied from {}:{}:{}",
                    i.resource.kind(),
                    i.resource.key(),
                    first.file.display(),
                    at.line,
                    at.column
                ),
            ));
        }
    }
    if !errors.is_empty() {
        let mut errors = ValidationErrors(errors);
        errors.sort();
        return Err(ApplyError::Invalid(errors));
    }

    // The directory as it is on disk, file by file, with each file's text, read as the loader
    // reads it (the same size limit, the same UTF-8 check).
    let targets: BTreeSet<&PathBuf> = incoming.iter().map(|i| &i.target).collect();
    let mut texts = BTreeMap::new();
    let mut existing = Vec::new();
    for path in model::yaml_files(dir).map_err(ApplyError::Invalid)? {
        let parsed = model::read_mesh_file(&path)
            .map_err(|e| ValidationErrors(vec![e]))
            .and_then(|body| Ok((model::parse_file(&path, &body)?, body)));
        match parsed {
            Ok((resources, body)) => {
                existing.extend(resources);
                texts.insert(path, body);
            }
            // The file this apply writes: replaced whole.
            Err(e) if targets.contains(&path) => {
                tracing::warn!(
                    file = %path.display(),
                    "replacing a mesh file that does not parse:\n{e}"
                );
                texts.insert(path, String::new());
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(ApplyError::Invalid(ValidationErrors(errors)));
    }

    let by_id: BTreeMap<(Kind, ObjectKey), &Incoming> = incoming
        .iter()
        .map(|i| ((i.resource.kind(), i.resource.key()), i))
        .collect();
    let mut outcome = Vec::new();
    // Per file, the byte ranges of the documents cut out of it.
    let mut replaced: BTreeMap<PathBuf, Vec<std::ops::Range<usize>>> = BTreeMap::new();
    let mut unchanged = BTreeSet::new();
    let mut candidate = Vec::new();
    for r in existing {
        let id = (r.kind(), r.key());
        let Some(new) = by_id.get(&id) else {
            candidate.push(r);
            continue;
        };
        let action = if new.resource.same_content(&r) {
            unchanged.insert(id);
            candidate.push(r.clone());
            Action::Unchanged
        } else {
            replaced
                .entry(r.origin().file.clone())
                .or_default()
                .push(r.origin().byte_range.clone());
            Action::Configured
        };
        let file = match action {
            Action::Unchanged => r.origin().file.clone(),
            _ => new.target.clone(),
        };
        outcome.push((
            new.input,
            Applied {
                kind: r.kind().to_string(),
                name: r.key().to_string(),
                action,
                file,
            },
        ));
    }
    let mut written: BTreeMap<&PathBuf, Vec<&Incoming>> = BTreeMap::new();
    for i in &incoming {
        let id = (i.resource.kind(), i.resource.key());
        if !outcome
            .iter()
            .any(|(_, o)| o.kind == id.0.to_string() && o.name == id.1.to_string())
        {
            outcome.push((
                i.input,
                Applied {
                    kind: id.0.to_string(),
                    name: id.1.to_string(),
                    action: Action::Created,
                    file: i.target.clone(),
                },
            ));
        }
        if !unchanged.contains(&id) {
            written.entry(&i.target).or_default().push(i);
            candidate.push(i.resource.clone());
        }
    }
    model::Model::from_resources(candidate).map_err(ApplyError::Invalid)?;
    // In the order the user gave them: file by file, document by document.
    outcome.sort_by_key(|(input, _)| *input);
    let outcome = ApplyOutcome {
        resources: outcome.into_iter().map(|(_, o)| o).collect(),
    };
    if written.is_empty() {
        return Ok(outcome);
    }

    // The new text of every file the apply touches.
    let mut bodies: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (path, ranges) in &replaced {
        let old = texts.get(path).map(String::as_str).unwrap_or_default();
        bodies.insert(path.clone(), cut(old, ranges));
    }
    for (target, docs) in written {
        let mut text = bodies
            .remove(target)
            .or_else(|| texts.get(target).cloned())
            .unwrap_or_default();
        for i in docs {
            let input = &files[i.input].yaml;
            let doc = input
                .get(i.resource.origin().byte_range.clone())
                .unwrap_or_default()
                .trim_matches('\n');
            if !text.trim().is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            if !text.trim().is_empty() {
                text.push_str("---\n");
            }
            text.push_str(doc);
            text.push('\n');
        }
        bodies.insert(target.clone(), text);
    }
    write_all(bodies)?;
    Ok(outcome)
}

/// Writes every file (or removes those left without resources), all or nothing: every new text
/// is written aside first; then each file replaced or removed is moved aside (a hidden name the
/// loader skips) and the new text renamed into its place. If any step fails, the steps done are
/// undone in reverse, so the directory is left as it was; only if undoing fails too (the
/// filesystem failing twice) does the error say which files are left where.
fn write_all(bodies: BTreeMap<PathBuf, String>) -> Result<(), ApplyError> {
    let mut staged = Vec::new();
    let mut removed = Vec::new();
    let result = (|| {
        for (path, body) in bodies {
            let still_has_resources = model::parse_file(&path, &body)
                .map(|r| !r.is_empty())
                .unwrap_or(true);
            if still_has_resources {
                staged.push((write_aside(&path, &body)?, path));
            } else {
                removed.push(path);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }

    // Each step done, to undo: (the file's place, where its old content went, if it had any).
    let mut done: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
    let mut step = |path: &Path, new: Option<&Path>| -> Result<(), ApplyError> {
        let backup = if path.exists() {
            let backup = aside(path, "keel-apply.old");
            std::fs::rename(path, &backup).map_err(io("moving aside", path))?;
            Some(backup)
        } else {
            None
        };
        if let Some(new) = new
            && let Err(e) = std::fs::rename(new, path)
        {
            if let Some(backup) = &backup {
                let _ = std::fs::rename(backup, path);
            }
            return Err(io("renaming into", path)(e));
        }
        done.push((path.to_path_buf(), backup));
        Ok(())
    };
    let mut outcome = Ok(());
    for (tmp, path) in &staged {
        outcome = step(path, Some(tmp));
        if outcome.is_err() {
            break;
        }
    }
    if outcome.is_ok() {
        for path in &removed {
            outcome = step(path, None);
            if outcome.is_err() {
                break;
            }
        }
    }
    match outcome {
        Ok(()) => {
            for (_, backup) in done {
                if let Some(backup) = backup {
                    let _ = std::fs::remove_file(backup);
                }
            }
            Ok(())
        }
        Err(e) => {
            for (tmp, _) in &staged {
                let _ = std::fs::remove_file(tmp);
            }
            let mut stranded = Vec::new();
            for (path, backup) in done.into_iter().rev() {
                let undone = match &backup {
                    Some(backup) => std::fs::rename(backup, &path),
                    None => std::fs::remove_file(&path),
                };
                if undone.is_err() {
                    stranded.push(match backup {
                        Some(backup) => format!(
                            "{} (its old content is in {})",
                            path.display(),
                            backup.display()
                        ),
                        None => format!("{} (new)", path.display()),
                    });
                }
            }
            if stranded.is_empty() {
                Err(e)
            } else {
                Err(ApplyError::PartlyUndone {
                    error: Box::new(e),
                    stranded: stranded.join(", "),
                })
            }
        }
    }
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

/// A hidden name next to `path` (the directory loader skips it), ending in `suffix`.
fn aside(path: &Path, suffix: &str) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    parent.join(format!(".{name}.{suffix}"))
}

/// Writes `body` next to `path` under a hidden name; returns that name.
fn write_aside(path: &Path, body: &str) -> Result<PathBuf, ApplyError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let tmp = aside(path, "keel-apply.tmp");
    std::fs::write(&tmp, body).map_err(io("writing", &tmp))?;
    Ok(tmp)
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

    fn file(name: &str, yaml: impl Into<String>) -> ApplyFile {
        ApplyFile {
            name: name.to_owned(),
            yaml: yaml.into(),
        }
    }

    fn load(dir: &Path) -> model::Model {
        model::load_dir(dir).expect("directory is valid").0
    }

    #[test]
    fn create_then_configure_then_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = apply(dir.path(), &[file("svc.yaml", SERVICE)]).expect("created");
        assert_eq!(out.resources[0].action, Action::Created);
        assert!(dir.path().join("applied/svc.yaml").exists());

        let out = apply(dir.path(), &[file("svc.yaml", SERVICE)]).expect("unchanged");
        assert_eq!(out.resources[0].action, Action::Unchanged);

        let out =
            apply(dir.path(), &[file("other.yaml", service_with_port(81))]).expect("configured");
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
        apply(dir.path(), &[file("fix.yaml", service_with_port(8080))]).expect("applied");
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
        let err = apply(dir.path(), &[file("bad.yaml", &bad)]).expect_err("unknown field");
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

    /// `a.yaml` routes to a service that `b.yaml` defines: applied together, in any order.
    fn routed_pair() -> [ApplyFile; 2] {
        let router = SERVICE.replace("name: articles", "name: front").replace(
            "  ports:",
            "  routes:\n  - name: all\n    destinations: [{service: articles}]\n  ports:",
        );
        [file("a.yaml", router), file("b.yaml", SERVICE)]
    }

    #[test]
    fn several_files_are_validated_together_and_written_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = apply(dir.path(), &routed_pair()).expect("valid together");
        let actions: Vec<(&str, Action)> = out
            .resources
            .iter()
            .map(|r| (r.name.as_str(), r.action))
            .collect();
        assert_eq!(
            actions,
            [
                ("demo/front", Action::Created),
                ("demo/articles", Action::Created)
            ]
        );
        assert!(dir.path().join("applied/a.yaml").exists());
        assert!(dir.path().join("applied/b.yaml").exists());
        assert_eq!(load(dir.path()).services.len(), 2);
    }

    #[test]
    fn one_bad_file_writes_nothing_and_names_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [a, _] = routed_pair();
        // b.yaml now defines another service: a.yaml's route dangles.
        let b = file("b.yaml", SERVICE.replace("name: articles", "name: other"));
        let err = apply(dir.path(), &[a, b]).expect_err("dangling");
        let ApplyError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(errors.0[0].file, PathBuf::from("a.yaml"));
        assert!(!dir.path().join(APPLIED_DIR).exists());
    }

    #[test]
    fn a_resource_applied_twice_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = apply(
            dir.path(),
            &[
                file("one.yaml", SERVICE),
                file("two.yaml", service_with_port(81)),
            ],
        )
        .expect_err("twice");
        let ApplyError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].file, PathBuf::from("two.yaml"));
        assert!(
            errors.0[0].reason.contains("also applied from one.yaml:4:"),
            "{}",
            errors.0[0].reason
        );
    }

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(applied_file_name("../../etc/passwd"), "passwd.yaml");
        assert_eq!(applied_file_name("my policy.yaml"), "my-policy.yaml");
        assert_eq!(applied_file_name("-"), "applied.yaml");
    }

    #[test]
    fn a_broken_file_blocks_an_apply_unless_the_apply_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        apply(dir.path(), &[file("svc.yaml", SERVICE)]).expect("created");
        let applied = dir.path().join("applied/svc.yaml");
        std::fs::write(&applied, "kind: [unclosed").expect("break it");
        // Another file's apply cannot pass: the directory stays invalid.
        let other = SERVICE.replace("name: articles", "name: comments");
        let err = apply(dir.path(), &[file("other.yaml", &other)]).expect_err("blocked");
        let ApplyError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(errors.0[0].file, applied);
        // Applying the same file again replaces the broken one.
        let out = apply(dir.path(), &[file("svc.yaml", SERVICE)]).expect("repaired");
        assert_eq!(out.resources[0].action, Action::Created);
        assert_eq!(load(dir.path()).services.len(), 1);
        assert!(
            !std::fs::read_to_string(&applied)
                .expect("read")
                .contains("unclosed")
        );
    }

    #[test]
    fn an_oversized_file_is_refused_as_the_loader_refuses_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = dir.path().join("big.yaml");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(17 << 20).expect("grow");
        let err = apply(dir.path(), &[file("svc.yaml", SERVICE)]).expect_err("refused");
        let ApplyError::Invalid(errors) = err else {
            panic!("expected a validation error, got {err}");
        };
        assert_eq!(errors.0[0].file, big);
        assert!(
            errors.0[0].reason.contains("bytes allowed"),
            "{}",
            errors.0[0].reason
        );
    }

    #[test]
    fn a_failed_rename_undoes_the_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.yaml");
        let z = dir.path().join("z.yaml");
        std::fs::write(&a, SERVICE).expect("write");
        std::fs::write(&z, SERVICE).expect("write");
        // Where z.yaml would be moved aside is a non-empty directory: that rename fails, after
        // a.yaml was already replaced.
        let occupied = aside(&z, "keel-apply.old");
        std::fs::create_dir_all(occupied.join("inside")).expect("mkdir");
        let bodies = BTreeMap::from([
            (a.clone(), service_with_port(81)),
            (z.clone(), service_with_port(82)),
        ]);
        let err = write_all(bodies).expect_err("moving z.yaml aside fails");
        assert!(matches!(err, ApplyError::Io { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(&a).expect("read"),
            SERVICE,
            "a.yaml restored"
        );
        assert_eq!(std::fs::read_to_string(&z).expect("read"), SERVICE);
        let hidden: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .filter(|p| *p != occupied)
            .collect();
        assert!(hidden.is_empty(), "left behind: {hidden:?}");
    }
}

//! Reading mesh YAML from the filesystem: which files count, in what order, and how a file that
//! cannot be read is reported.
//!
//! A directory contributes every `*.yaml` / `*.yml` file beneath it, sorted by path, skipping
//! hidden entries (which also skips the `..data` indirection of Kubernetes ConfigMap volumes,
//! whose visible files are symlinks into it) and editor temporary files. Symlinks are followed,
//! with a guard against directory loops. This module must never panic on a filesystem surprise
//! and never skip a file silently that the user named explicitly.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use super::error::{ErrorKind, ValidationError, ValidationErrors};
use super::mesh::Model;
use super::parse::parse_file;
use super::resources::Position;

/// Mesh files are hand-written and small; anything larger is a mistake (or a device file).
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A mesh file found in a directory, with its metadata as the directory walk saw it.
#[derive(Debug, Clone)]
pub struct MeshFile {
    pub path: PathBuf,
    pub metadata: fs::Metadata,
}

/// Loads every mesh file under `dir` (recursively). Returns the model and the files read, in
/// the order they were read.
pub fn load_dir(dir: &Path) -> Result<(Model, Vec<PathBuf>), ValidationErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    collect_dir(dir, &mut BTreeSet::new(), &mut files, &mut errors);
    let mut files: Vec<PathBuf> = files.into_iter().map(|f| f.path).collect();
    files.sort();
    let model = load_paths(&files, errors)?;
    Ok((model, files))
}

/// The mesh files under `dir`, sorted by path, as `load_dir` reads them.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ValidationErrors> {
    Ok(mesh_files(dir)?.into_iter().map(|f| f.path).collect())
}

/// Like [`yaml_files`], with each file's metadata (one `stat` each, which the walk needs anyway).
pub fn mesh_files(dir: &Path) -> Result<Vec<MeshFile>, ValidationErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    collect_dir(dir, &mut BTreeSet::new(), &mut files, &mut errors);
    if !errors.is_empty() {
        let mut errors = ValidationErrors(errors);
        errors.sort();
        return Err(errors);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Loads the given files and directories as one model (`keelctl validate -f a.yaml -f dir/`).
/// A file named explicitly is read whatever its extension; a file reached twice is read once.
pub fn load_files(paths: &[PathBuf]) -> Result<Model, ValidationErrors> {
    let mut errors = Vec::new();
    let mut files = Vec::new();
    let mut visited_dirs = BTreeSet::new();
    for path in paths {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                let mut found = Vec::new();
                collect_dir(path, &mut visited_dirs, &mut found, &mut errors);
                let mut found: Vec<PathBuf> = found.into_iter().map(|f| f.path).collect();
                found.sort();
                files.extend(found);
            }
            Ok(_) => files.push(path.clone()),
            Err(e) => errors.push(ValidationError::file(
                path,
                ErrorKind::Io,
                format!("cannot read: {e}"),
            )),
        }
    }
    let mut seen = BTreeSet::new();
    files.retain(|f| seen.insert(fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    load_paths(&files, errors)
}

fn load_paths(
    files: &[PathBuf],
    mut errors: Vec<ValidationError>,
) -> Result<Model, ValidationErrors> {
    let mut resources = Vec::new();
    for file in files {
        let text = match read_mesh_file(file) {
            Ok(text) => text,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        match parse_file(file, &text) {
            Ok(mut parsed) => {
                tracing::debug!(file = %file.display(), resources = parsed.len(), "read mesh file");
                resources.append(&mut parsed);
            }
            Err(problems) => errors.extend(problems),
        }
    }
    // Cross-resource checks on a partial set would report references to resources that merely
    // failed to parse, so they run only on a clean parse.
    if !errors.is_empty() {
        let mut errors = ValidationErrors(errors);
        errors.sort();
        return Err(errors);
    }
    Model::from_resources(resources)
}

fn is_skipped(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.starts_with('#')
        || [".swp", ".swo", ".swx"].iter().any(|s| name.ends_with(s))
}

fn is_mesh_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn collect_dir(
    dir: &Path,
    visited: &mut BTreeSet<PathBuf>,
    files: &mut Vec<MeshFile>,
    errors: &mut Vec<ValidationError>,
) {
    let canonical = match fs::canonicalize(dir) {
        Ok(canonical) => canonical,
        Err(e) => {
            errors.push(ValidationError::file(
                dir,
                ErrorKind::Io,
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    if !visited.insert(canonical) {
        // Reached again through a symlink: already collected (or a loop).
        return;
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ValidationError::file(
                dir,
                ErrorKind::Io,
                format!("cannot read directory: {e}"),
            ));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                errors.push(ValidationError::file(
                    dir,
                    ErrorKind::Io,
                    format!("cannot list directory: {e}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::debug!(path = %path.display(), "skipping entry whose name is not UTF-8");
            continue;
        };
        if is_skipped(name) {
            tracing::debug!(path = %path.display(), "skipping hidden or temporary entry");
            continue;
        }
        // Symlinks are followed (`fs::metadata`), so linked files and directories count as
        // themselves. Anything else is looked up relative to the directory being read, which
        // spares resolving the whole path again for every file of a large directory.
        let metadata = match entry.file_type() {
            Ok(t) if !t.is_symlink() => entry.metadata(),
            _ => fs::metadata(&path),
        };
        match metadata {
            Ok(meta) if meta.is_dir() => collect_dir(&path, visited, files, errors),
            Ok(metadata) if metadata.is_file() && is_mesh_file(&path) => {
                files.push(MeshFile { path, metadata });
            }
            Ok(_) => {}
            Err(e) if is_mesh_file(&path) => errors.push(ValidationError::file(
                &path,
                ErrorKind::Io,
                format!("cannot read: {e}"),
            )),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "skipping unreadable entry");
            }
        }
    }
}

/// A mesh file's text: at most 16 MiB of UTF-8, or an error naming the file (and, for bad
/// UTF-8, the position).
pub fn read_mesh_file(path: &Path) -> Result<String, ValidationError> {
    let io_error =
        |e: std::io::Error| ValidationError::file(path, ErrorKind::Io, format!("cannot read: {e}"));
    let meta = fs::metadata(path).map_err(io_error)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(ValidationError::file(
            path,
            ErrorKind::Io,
            format!(
                "file is {} bytes, more than the {MAX_FILE_BYTES} bytes allowed for a mesh file",
                meta.len()
            ),
        ));
    }
    let bytes = fs::read(path).map_err(io_error)?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let at = position_of_byte(e.as_bytes(), valid);
        ValidationError::new(path, at, "", ErrorKind::Syntax, "file is not valid UTF-8")
    })
}

/// The line and column of byte `offset` in `bytes`, which are valid UTF-8 up to `offset`.
fn position_of_byte(bytes: &[u8], offset: usize) -> Position {
    let prefix = bytes.get(..offset).unwrap_or_default();
    let line_start = prefix
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + prefix.iter().filter(|b| **b == b'\n').count();
    let column = 1 + std::str::from_utf8(prefix.get(line_start..).unwrap_or_default())
        .map_or(0, |s| s.chars().count());
    Position { line, column }
}

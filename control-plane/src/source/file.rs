//! The file source: a directory of mesh YAML, watched for changes. The default source; it needs
//! no cluster.
//!
//! Every change re-checks the whole directory, but the work done grows with what changed, not
//! with the mesh: the directory is walked (one `stat` per file), only files whose metadata
//! changed are read, only files whose content changed are parsed, and the resources of those
//! files are validated against the rest incrementally ([`IndexedModel`]). A state is published
//! only when all of it is valid, so a bad edit is rejected as a whole (logged, and shown by
//! `keelctl status`) and the last good model keeps being served. Bursts of events (an editor's
//! save) are coalesced by a short debounce; `keelctl apply` holds the loader while it writes, so
//! a load never sees half an apply.
//!
//! This source must never publish a partially valid state.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::apply::{self, ApplyError, ApplyFile, ApplyOutcome};
use crate::model::{self, IndexedModel, MeshFile, Model, Resource, ValidationErrors};
use crate::store::Store;

/// Quiet time after the last event before the directory is reloaded, while a file written to
/// has not been closed yet (its writer may not be done)...
const DEBOUNCE: Duration = Duration::from_millis(15);
/// ...and once every file written to was closed: a quiet directory reloads almost at once. It
/// still takes in what a writer does right after closing (an editor's rename into place follows
/// its close within microseconds); a longer burst (several files copied) keeps pushing the reload
/// back by this much per event, up to `MAX_DELAY`, and what comes after a reload started makes
/// another one. A transient state seen meanwhile is validated like any other: at worst it is
/// rejected and the next reload, moments later, serves the final one.
const SETTLE: Duration = Duration::from_millis(1);
/// A steady stream of events still reloads at least this often.
const MAX_DELAY: Duration = Duration::from_millis(60);

/// A file modified less than this before it was read may be modified again with the same
/// size and timestamp (file times have a coarse granularity), so its metadata cannot vouch for
/// its content: it is read again on every load until it has been quiet this long ("racy" files,
/// as git calls them).
const RACY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot watch {dir}: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("{dir} is not a directory")]
    NotADirectory { dir: PathBuf },
}

/// Loads a directory into a model, remembering each file's metadata and parsed resources, and
/// the files the last good model was built from.
#[derive(Debug)]
pub struct DirectoryLoader {
    dir: PathBuf,
    state: Mutex<LoaderState>,
}

#[derive(Debug, Default)]
struct LoaderState {
    /// The newest read of every file in the directory.
    files: HashMap<PathBuf, CachedFile>,
    /// The last good model and the files it was built from.
    accepted: Option<Accepted>,
}

#[derive(Debug)]
struct CachedFile {
    /// The metadata the file had when read; `None` when it must be read again regardless.
    stamp: Option<Stamp>,
    hash: u64,
    resources: Result<Arc<[Resource]>, ValidationErrors>,
}

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed_sec: i64,
    changed_nsec: i64,
}

impl Stamp {
    /// The file's stamp, unless it was modified so recently that the stamp could repeat.
    fn of(metadata: &std::fs::Metadata, read_at: SystemTime) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let modified = metadata.modified().ok();
        let settled = modified
            .and_then(|m| read_at.duration_since(m).ok())
            .is_some_and(|age| age > RACY);
        settled.then(|| Stamp {
            len: metadata.len(),
            modified,
            inode: metadata.ino(),
            changed_sec: metadata.ctime(),
            changed_nsec: metadata.ctime_nsec(),
        })
    }

    fn matches(&self, metadata: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.len == metadata.len()
            && self.modified == metadata.modified().ok()
            && self.inode == metadata.ino()
            && self.changed_sec == metadata.ctime()
            && self.changed_nsec == metadata.ctime_nsec()
    }
}

#[derive(Debug)]
struct Accepted {
    /// Path -> (content hash, resources) of every file in the model.
    files: HashMap<PathBuf, (u64, Arc<[Resource]>)>,
    model: IndexedModel,
}

impl DirectoryLoader {
    pub fn new(dir: PathBuf) -> Arc<DirectoryLoader> {
        Arc::new(DirectoryLoader {
            dir,
            state: Mutex::new(LoaderState::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loader's state; holding it keeps every other load and apply out of the directory.
    fn lock(&self) -> MutexGuard<'_, LoaderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads and validates the whole directory (blocking: call from a blocking thread).
    pub fn load(&self) -> Result<Arc<Model>, ValidationErrors> {
        self.load_locked(&mut self.lock())
    }

    /// `keelctl apply` (blocking): writes `files` into the directory as one change
    /// ([`apply::apply`]) while no load runs, so that the watcher never reads half of it, then
    /// loads the result.
    pub fn apply(
        &self,
        files: &[ApplyFile],
    ) -> Result<(ApplyOutcome, Result<Arc<Model>, ValidationErrors>), ApplyError> {
        let mut state = self.lock();
        let outcome = apply::apply(&self.dir, files)?;
        Ok((outcome, self.load_locked(&mut state)))
    }

    fn load_locked(&self, state: &mut LoaderState) -> Result<Arc<Model>, ValidationErrors> {
        let started = std::time::Instant::now();
        let listed = model::mesh_files(&self.dir)?;
        let walked = started.elapsed();
        let present: HashSet<&Path> = listed.iter().map(|f| f.path.as_path()).collect();
        state
            .files
            .retain(|path, _| present.contains(path.as_path()));
        let mut errors = Vec::new();
        for file in &listed {
            refresh(&mut state.files, file, &mut errors);
        }
        tracing::debug!(
            files = listed.len(),
            walk_us = walked.as_micros() as u64,
            read_us = (started.elapsed() - walked).as_micros() as u64,
            "mesh directory read"
        );
        if !errors.is_empty() {
            let mut errors = ValidationErrors(errors);
            errors.sort();
            return Err(errors);
        }
        let current = |path: &Path| -> Option<(u64, Arc<[Resource]>)> {
            let cached = state.files.get(path)?;
            Some((cached.hash, cached.resources.as_ref().ok()?.clone()))
        };

        // What changed since the last good model: the resources of the files that changed,
        // appeared or went away.
        if let Some(accepted) = &mut state.accepted {
            let mut removed = Vec::new();
            let mut added = Vec::new();
            let mut changed = Vec::new();
            for file in &listed {
                let Some((hash, now)) = current(&file.path) else {
                    continue;
                };
                match accepted.files.get(&file.path) {
                    Some((before, _)) if *before == hash => {}
                    Some((_, was)) => {
                        removed.extend(was.iter().cloned());
                        added.extend(now.iter().cloned());
                        changed.push((file.path.clone(), Some((hash, now))));
                    }
                    None => {
                        added.extend(now.iter().cloned());
                        changed.push((file.path.clone(), Some((hash, now))));
                    }
                }
            }
            for (path, (_, was)) in &accepted.files {
                if !present.contains(path.as_path()) {
                    removed.extend(was.iter().cloned());
                    changed.push((path.clone(), None));
                }
            }
            if changed.is_empty() {
                return Ok(accepted.model.model().clone());
            }
            if accepted.model.replace(&removed, &added) {
                for (path, now) in changed {
                    match now {
                        Some(now) => accepted.files.insert(path, now),
                        None => accepted.files.remove(&path),
                    };
                }
                return Ok(accepted.model.model().clone());
            }
            tracing::debug!(
                files = changed.len(),
                "the change is invalid; validating the whole directory for the errors"
            );
        }

        // The first load, or a change that failed the incremental check: validate everything,
        // in file order, so that errors name the later of two conflicting definitions.
        let resources: Vec<Resource> = listed
            .iter()
            .filter_map(|f| current(&f.path))
            .flat_map(|(_, r)| r.iter().cloned().collect::<Vec<_>>())
            .collect();
        match IndexedModel::new(resources) {
            Ok(indexed) => {
                let files = listed
                    .iter()
                    .filter_map(|f| Some((f.path.clone(), current(&f.path)?)))
                    .collect();
                let model = indexed.model().clone();
                state.accepted = Some(Accepted {
                    files,
                    model: indexed,
                });
                Ok(model)
            }
            Err(errors) => Err(errors),
        }
    }

    /// Reads and validates the whole directory, then publishes or rejects it.
    pub async fn reload(self: &Arc<Self>, store: &Store) {
        let loader = self.clone();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || loader.load()).await;
        self.publish(store, loaded, started);
    }

    /// Publishes (or rejects) what a load produced, logging how long it took.
    pub fn publish(
        &self,
        store: &Store,
        loaded: Result<Result<Arc<Model>, ValidationErrors>, tokio::task::JoinError>,
        started: std::time::Instant,
    ) {
        let load_time = started.elapsed();
        match loaded {
            Ok(Ok(model)) => {
                let version = store.publish(model);
                tracing::info!(
                    dir = %self.dir.display(),
                    version,
                    load_ms = load_time.as_secs_f64() * 1000.0,
                    publish_ms = (started.elapsed() - load_time).as_secs_f64() * 1000.0,
                    "loaded mesh directory"
                );
            }
            Ok(Err(errors)) => store.reject(errors),
            Err(join) => store.reject(ValidationErrors::single(
                &self.dir,
                format!("loading the directory failed: {join}"),
            )),
        }
    }
}

/// Brings the cache entry of `file` up to date: read again unless its metadata vouches for the
/// cached content, parsed again only if the content changed.
fn refresh(
    files: &mut HashMap<PathBuf, CachedFile>,
    file: &MeshFile,
    errors: &mut Vec<model::ValidationError>,
) {
    let cached = files.get(&file.path);
    if let Some(cached) = cached
        && cached
            .stamp
            .as_ref()
            .is_some_and(|s| s.matches(&file.metadata))
    {
        if let Err(e) = &cached.resources {
            errors.extend(e.0.iter().cloned());
        }
        return;
    }
    let read_at = SystemTime::now();
    let text = match model::read_mesh_file(&file.path) {
        Ok(text) => text,
        Err(error) => {
            files.remove(&file.path);
            errors.push(error);
            return;
        }
    };
    let stamp = Stamp::of(&file.metadata, read_at);
    let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
    let entry = match files.remove(&file.path) {
        Some(cached) if cached.hash == hash => CachedFile { stamp, ..cached },
        _ => CachedFile {
            stamp,
            hash,
            resources: model::parse_file(&file.path, &text).map(Arc::from),
        },
    };
    if let Err(e) = &entry.resources {
        errors.extend(e.0.iter().cloned());
    }
    files.insert(file.path.clone(), entry);
}

/// A running file source. Dropping it stops the watch.
pub struct FileSource {
    pub loader: Arc<DirectoryLoader>,
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `event` is a file closed after being written to (inotify's `IN_CLOSE_WRITE`).
fn closed_after_writing(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// Takes in one watch event; returns how long to wait for more before reloading.
fn note(
    dir: &Path,
    event: notify::Result<notify::Event>,
    writing: &mut HashSet<PathBuf>,
) -> Duration {
    use notify::event::{CreateKind, EventKind, ModifyKind};
    match event {
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "file watch error");
            // Events may have been lost: nothing is known about writers.
            writing.clear();
            return DEBOUNCE;
        }
        Ok(event) if closed_after_writing(&event) => {
            for path in &event.paths {
                writing.remove(path);
            }
        }
        Ok(event) => match event.kind {
            EventKind::Create(CreateKind::File | CreateKind::Any)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                writing.extend(event.paths);
            }
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for path in &event.paths {
                    writing.remove(path);
                }
            }
            _ => {}
        },
    }
    if writing.is_empty() { SETTLE } else { DEBOUNCE }
}

impl FileSource {
    /// Loads `dir` into `store` (recording the errors if it is invalid) and keeps watching it.
    pub async fn start(dir: PathBuf, store: Arc<Store>) -> Result<FileSource, FileSourceError> {
        if !dir.is_dir() {
            return Err(FileSourceError::NotADirectory { dir });
        }
        store.set_source(format!("directory {}", dir.display()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Access events (reads, closes without writing) are ours or harmless; a close
                // after writing says a writer is done.
                let relevant = match &event {
                    Ok(e) => !e.kind.is_access() || closed_after_writing(e),
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(event);
                }
            })
            .map_err(|source| FileSourceError::Watch {
                dir: dir.clone(),
                source,
            })?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|source| FileSourceError::Watch {
                dir: dir.clone(),
                source,
            })?;
        let loader = DirectoryLoader::new(dir.clone());
        loader.reload(&store).await;

        let task_loader = loader.clone();
        let task = tokio::spawn(async move {
            // Files written to and not closed since.
            let mut writing = HashSet::new();
            while let Some(first) = rx.recv().await {
                let first_at = Instant::now();
                let mut events = 1;
                let deadline = first_at + MAX_DELAY;
                let mut quiet = first_at + note(&dir, first, &mut writing);
                loop {
                    tokio::select! {
                        more = rx.recv() => match more {
                            Some(event) => {
                                events += 1;
                                let wait = note(&dir, event, &mut writing);
                                quiet = (Instant::now() + wait).min(deadline);
                            }
                            None => return,
                        },
                        _ = sleep_until(quiet) => break,
                    }
                }
                tracing::debug!(
                    events,
                    debounce_us = first_at.elapsed().as_micros() as u64,
                    "mesh directory changed; reloading"
                );
                task_loader.reload(&store).await;
                // A writer still busy shows up again with its next write; one that went away
                // without closing must not slow every later reload down.
                writing.clear();
            }
        });
        Ok(FileSource {
            loader,
            _watcher: watcher,
            task,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// `s{i}` routes to `s{i+1}`, the last to nothing: any part of a set of these is invalid
    /// unless it is a tail of the chain.
    fn chain(len: usize, port: u16) -> Vec<ApplyFile> {
        (0..len)
            .map(|i| {
                let routes = if i + 1 < len {
                    format!(
                        "  routes:\n  - name: next\n    destinations: [{{service: s{:02}}}]\n",
                        i + 1
                    )
                } else {
                    String::new()
                };
                ApplyFile {
                    name: format!("s{i:02}.yaml"),
                    yaml: format!(
                        "apiVersion: keel.dev/v1alpha1\nkind: Service\nmetadata: {{name: s{i:02}, namespace: demo}}\nspec:\n  ports: [{{port: {port}}}]\n{routes}"
                    ),
                }
            })
            .collect()
    }

    #[test]
    fn a_load_never_sees_half_an_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loader = DirectoryLoader::new(dir.path().to_path_buf());
        assert!(loader.load().expect("empty is valid").services.is_empty());
        let stop = AtomicBool::new(false);
        let seen = std::thread::scope(|scope| {
            // A reader loading as fast as it can, as the watcher would on every event.
            let reader = scope.spawn(|| {
                let mut seen = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let found = match loader.load() {
                        Ok(model) => {
                            let ports: BTreeSet<u16> = model
                                .services
                                .values()
                                .flat_map(|s| s.spec.ports.iter().map(|p| p.port))
                                .collect();
                            format!("{} services, ports {ports:?}", model.services.len())
                        }
                        Err(errors) => format!("rejected: {errors}"),
                    };
                    *seen.entry(found).or_insert(0) += 1;
                }
                seen
            });
            // Created, then every resource replaced twice.
            for port in [80, 81, 82] {
                let (_, loaded) = loader.apply(&chain(40, port)).expect("valid as a whole");
                assert_eq!(loaded.expect("loads").services.len(), 40);
            }
            stop.store(true, Ordering::Relaxed);
            reader.join().expect("reader")
        });
        let whole = [
            "0 services, ports {}",
            "40 services, ports {80}",
            "40 services, ports {81}",
            "40 services, ports {82}",
        ];
        assert!(
            seen.keys().all(|s| whole.contains(&s.as_str())),
            "a load saw a state no apply left: {seen:?}"
        );
    }
}

//! The file source: a directory of mesh YAML, watched for changes. The default source; it needs
//! no cluster.
//!
//! Every change reloads and validates the whole directory: a state is published only when all of
//! it is valid, so a bad edit is rejected as a whole (logged, and shown by `keelctl status`) and
//! the last good model keeps being served. Bursts of events (an editor's save, `keelctl apply`
//! writing several files) are coalesced by a short debounce.
//!
//! Files are re-parsed only when their content changed (a large mesh is thousands of documents;
//! an edit touches one file), but the cross-resource validation always runs over the whole state.
//!
//! This source must never publish a partially valid state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::model::{self, Model, Resource, ValidationErrors};
use crate::store::Store;

/// Quiet time after the last event before the directory is reloaded.
const DEBOUNCE: Duration = Duration::from_millis(15);
/// A steady stream of events still reloads at least this often.
const MAX_DELAY: Duration = Duration::from_millis(60);

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

/// Loads a directory into a model, remembering each file's parsed resources by content.
#[derive(Debug)]
pub struct DirectoryLoader {
    dir: PathBuf,
    parsed: Mutex<HashMap<PathBuf, ParsedFile>>,
}

#[derive(Debug)]
struct ParsedFile {
    hash: u64,
    resources: Result<Vec<Resource>, ValidationErrors>,
}

impl DirectoryLoader {
    pub fn new(dir: PathBuf) -> Arc<DirectoryLoader> {
        Arc::new(DirectoryLoader {
            dir,
            parsed: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and validates the whole directory (blocking: call from a blocking thread).
    pub fn load(&self) -> Result<Model, ValidationErrors> {
        let files = model::yaml_files(&self.dir)?;
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        let present: std::collections::HashSet<&PathBuf> = files.iter().collect();
        parsed.retain(|path, _| present.contains(path));
        let mut resources = Vec::new();
        let mut errors = Vec::new();
        for path in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    errors.extend(ValidationErrors::single(&path, format!("cannot read: {e}")).0);
                    continue;
                }
            };
            let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
            let entry = parsed.entry(path.clone()).or_insert_with(|| ParsedFile {
                hash: hash.wrapping_add(1),
                resources: Ok(Vec::new()),
            });
            if entry.hash != hash {
                entry.hash = hash;
                entry.resources = model::parse_file(&path, &text);
            }
            match &entry.resources {
                Ok(r) => resources.extend(r.iter().cloned()),
                Err(e) => errors.extend(e.0.iter().cloned()),
            }
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        Model::from_resources(resources)
    }

    /// Reads and validates the whole directory, then publishes or rejects it.
    pub async fn reload(self: &Arc<Self>, store: &Store) {
        let loader = self.clone();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || loader.load()).await;
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
                // Access events (reads, closes without writing) are ours or harmless.
                let relevant = match &event {
                    Ok(e) => !e.kind.is_access(),
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
            while let Some(first) = rx.recv().await {
                if let Err(e) = first {
                    tracing::warn!(dir = %dir.display(), error = %e, "file watch error");
                }
                let deadline = Instant::now() + MAX_DELAY;
                let mut quiet = Instant::now() + DEBOUNCE;
                loop {
                    tokio::select! {
                        more = rx.recv() => match more {
                            Some(_) => quiet = (Instant::now() + DEBOUNCE).min(deadline),
                            None => return,
                        },
                        _ = sleep_until(quiet) => break,
                    }
                }
                task_loader.reload(&store).await;
            }
        });
        Ok(FileSource {
            loader,
            _watcher: watcher,
            task,
        })
    }
}

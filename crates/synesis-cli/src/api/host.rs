//! The models the service keeps loaded between answers: each stays for `keep_alive` after its
//! last use (as Ollama does), so a second request skips the load. One load at a time; a model
//! in use is never unloaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use synesis_infer::{Model, Settings};
use tokio::sync::Mutex;

/// Models kept loaded at once: loading one more unloads the least recently used one not in
/// use (each is its weights in memory, hundreds of megabytes and more).
pub(crate) const MODELS_LOADED_MAX: usize = 3;

struct Loaded {
    model: Arc<Model>,
    path: PathBuf,
    last_used: Instant,
}

pub(crate) struct ModelHost {
    keep_alive: Duration,
    loaded: Mutex<HashMap<String, Loaded>>,
}

impl ModelHost {
    pub(crate) fn new(keep_alive: Duration) -> Arc<ModelHost> {
        Arc::new(ModelHost {
            keep_alive,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The model registered as `name` (its file at `path`), loaded now if it is not loaded, or
    /// was loaded from another file. The second value says whether this call loaded it.
    pub(crate) async fn get(&self, name: &str, path: &Path) -> anyhow::Result<(Arc<Model>, bool)> {
        // Held across a load: two requests for a cold model load it once.
        let mut loaded = self.loaded.lock().await;
        if let Some(slot) = loaded.get_mut(name)
            && slot.path == path
        {
            slot.last_used = Instant::now();
            return Ok((Arc::clone(&slot.model), false));
        }
        let file = path.to_owned();
        let model = tokio::task::spawn_blocking(move || Model::load(&file, Settings::default()))
            .await
            .context("the model thread failed")?
            .with_context(|| format!("cannot load model {name:?} from {}", path.display()))?;
        let model = Arc::new(model);
        if !self.keep_alive.is_zero() {
            while loaded.len() >= MODELS_LOADED_MAX {
                let idle = loaded
                    .iter()
                    .filter(|(_, slot)| Arc::strong_count(&slot.model) == 1)
                    .min_by_key(|(_, slot)| slot.last_used)
                    .map(|(name, _)| name.clone());
                let Some(idle) = idle else { break };
                tracing::info!(model = %idle, "unloaded to make room");
                loaded.remove(&idle);
            }
            loaded.insert(
                name.to_owned(),
                Loaded {
                    model: Arc::clone(&model),
                    path: path.to_owned(),
                    last_used: Instant::now(),
                },
            );
        }
        Ok((model, true))
    }

    /// The names of the models loaded now.
    pub(crate) async fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.loaded.lock().await.keys().cloned().collect();
        names.sort();
        names
    }

    /// Unloads the models idle for `keep_alive` (never one in use); returns how many.
    pub(crate) async fn unload_idle(&self, now: Instant) -> usize {
        let mut loaded = self.loaded.lock().await;
        let before = loaded.len();
        loaded.retain(|name, slot| {
            let keep = Arc::strong_count(&slot.model) > 1
                || now.saturating_duration_since(slot.last_used) < self.keep_alive;
            if !keep {
                tracing::info!(model = %name, "unloaded after its keep_alive");
            }
            keep
        });
        before - loaded.len()
    }

    /// Unloads idle models for as long as it runs.
    pub(crate) async fn unload_forever(self: Arc<ModelHost>) {
        let every = (self.keep_alive / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::time::sleep(every).await;
            self.unload_idle(Instant::now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_model_stays_loaded_for_its_keep_alive_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        synesis_infer::tiny::write_model(&path, synesis_infer::tiny::TinySpec::TINY).unwrap();
        let host = ModelHost::new(Duration::from_secs(300));
        let (first, loaded) = host.get("tiny", &path).await.unwrap();
        assert!(loaded);
        let (again, loaded) = host.get("tiny", &path).await.unwrap();
        assert!(!loaded, "the second request skips the load");
        assert!(Arc::ptr_eq(&first, &again));
        // In use: kept, however long idle.
        let later = Instant::now() + Duration::from_secs(3_600);
        assert_eq!(host.unload_idle(later).await, 0);
        drop((first, again));
        assert_eq!(
            host.unload_idle(Instant::now()).await,
            0,
            "within keep_alive"
        );
        assert_eq!(host.unload_idle(later).await, 1);
        assert!(host.names().await.is_empty());
        let (_, loaded) = host.get("tiny", &path).await.unwrap();
        assert!(loaded, "loaded again after it was unloaded");

        // At most MODELS_LOADED_MAX: the least recently used one makes room.
        for name in ["a", "b", "c"] {
            host.get(name, &path).await.unwrap();
        }
        assert_eq!(host.names().await, ["a", "b", "c"]);
    }
}

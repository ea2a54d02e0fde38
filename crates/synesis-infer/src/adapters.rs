//! LoRA adapters loaded while the model serves: pinned ones ([`Model::load_adapter`]) and a
//! bounded cache of adapters loaded on first use (`Request::lora_file`), least recently used
//! out, each freed when the last generation using it ends.
//!
//! `llama-cpp-2` (pinned at `=0.1.160`) loads an adapter through `&mut LlamaModel` and never
//! frees one, which would mean no loading while a generation runs and memory that only grows.
//! This module is the one place that steps around that, with `unsafe` limited to two calls
//! whose conditions are kept here (THREAD_SAFETY_PATTERNS.md, *llama.cpp adapters*):
//!
//! - llama.cpp keeps a set of the model's adapters (`llama_model::loras`). Loading and freeing
//!   write it; a context reads it when it reserves its compute graph, which happens when the
//!   context is created and on the first decode after an adapter is attached. [`Adapters::graph`]
//!   is the lock around that set: loading and freeing take it for writing, a generation holds it
//!   for reading from creating its context until its prompt is decoded.
//! - An adapter is freed only when nothing can use it: it lives in an `Arc` held by the cache
//!   (or the pinned map) and by each generation attached to it, and the model outlives all of
//!   them (`Model` drops its `Adapters` before its `LlamaModel`).
//!
//! [`Model::load_adapter`]: crate::Model::load_adapter

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use crate::engine::InferError;
use crate::metadata::GgufMetadata;

type RawAdapter = llama_cpp_sys_2::llama_adapter_lora;

/// One loaded adapter.
pub(crate) struct Adapter {
    /// Attaching needs it mutably for an instant.
    handle: Mutex<LlamaLoraAdapter>,
    graph: Arc<RwLock<()>>,
}

impl Adapter {
    /// Runs `f` with the adapter (for `LlamaContext::lora_adapter_set`).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut LlamaLoraAdapter) -> T) -> T {
        f(&mut self.handle.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        const {
            assert!(size_of::<LlamaLoraAdapter>() == size_of::<NonNull<RawAdapter>>());
        }
        let handle = self
            .handle
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        // SAFETY: `LlamaLoraAdapter` is `#[repr(transparent)]` over `Ptr`, itself
        // `#[repr(transparent)]` over `NonNull<llama_adapter_lora>` (llama-cpp-2 =0.1.160; the
        // sizes are checked above). It has no `Drop`, so copying its pointer out leaves
        // nothing else to release.
        let raw: NonNull<RawAdapter> = unsafe { std::mem::transmute_copy(handle) };
        let _graph = self.graph.write().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the pointer came from `llama_adapter_lora_init` and is freed once (this is
        // the one owner, being dropped). No context uses it: each generation attached to it
        // holds an `Arc` to this adapter. The model is alive (module doc), and the write lock
        // keeps every reader of the model's adapter set out while it changes.
        unsafe { llama_cpp_sys_2::llama_adapter_lora_free(raw.as_ptr()) };
    }
}

/// The adapters of one model.
pub(crate) struct Adapters {
    graph: Arc<RwLock<()>>,
    pinned: Mutex<HashMap<String, Arc<Adapter>>>,
    /// Loaded on demand; the most recently used last.
    cached: Mutex<Vec<(String, Arc<Adapter>)>>,
    capacity: usize,
}

/// An adapter found or loaded for one generation, and how long loading it took (cold).
pub(crate) struct Found {
    pub(crate) adapter: Arc<Adapter>,
    pub(crate) loaded_in: Option<Duration>,
}

impl Adapters {
    pub(crate) fn new(capacity: usize) -> Adapters {
        Adapters {
            graph: Arc::new(RwLock::new(())),
            pinned: Mutex::new(HashMap::new()),
            cached: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
        }
    }

    /// Held (shared) by a generation from creating its context until its prompt is decoded.
    pub(crate) fn graph(&self) -> RwLockReadGuard<'_, ()> {
        self.graph.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn pinned_names(&self) -> Vec<String> {
        let pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<_> = pinned.keys().cloned().collect();
        names.sort();
        names
    }

    /// Names of the adapters in the cache, least recently used first.
    pub(crate) fn cached_names(&self) -> Vec<String> {
        let cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        cached.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Loads `path` as the pinned adapter `name` (kept as long as the model), once.
    pub(crate) fn pin(
        &self,
        model: &LlamaModel,
        architecture: &str,
        name: &str,
        path: &Path,
    ) -> Result<Duration, InferError> {
        if self.lock_pinned().contains_key(name) {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let adapter = self.load(model, architecture, path)?;
        self.lock_pinned()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(adapter));
        Ok(started.elapsed())
    }

    /// The adapter `name`: pinned, cached, or else loaded from `file` into the cache.
    pub(crate) fn find(
        &self,
        model: &LlamaModel,
        architecture: &str,
        name: &str,
        file: Option<&Path>,
    ) -> Result<Found, InferError> {
        if let Some(adapter) = self.lock_pinned().get(name) {
            return Ok(Found {
                adapter: Arc::clone(adapter),
                loaded_in: None,
            });
        }
        if let Some(adapter) = self.touch(name) {
            return Ok(Found {
                adapter,
                loaded_in: None,
            });
        }
        let Some(file) = file else {
            return Err(InferError::UnknownAdapter(name.to_owned()));
        };
        let started = Instant::now();
        let loaded = Arc::new(self.load(model, architecture, file)?);
        let loaded_in = started.elapsed();
        let (adapter, evicted) = {
            let mut cached = self.lock_cached();
            // Two generations may have loaded the same adapter at once: the first one kept wins.
            if let Some(i) = cached.iter().position(|(n, _)| n == name) {
                let entry = cached.remove(i);
                let adapter = Arc::clone(&entry.1);
                cached.push(entry);
                (adapter, vec![loaded])
            } else {
                cached.push((name.to_owned(), Arc::clone(&loaded)));
                let over = cached.len().saturating_sub(self.capacity);
                let evicted: Vec<_> = cached.drain(..over).map(|(_, a)| a).collect();
                (loaded, evicted)
            }
        };
        // Freed (when no generation holds them) outside the cache's lock: freeing waits for
        // the graph lock, and lookups of warm adapters should not wait behind it.
        drop(evicted);
        Ok(Found {
            adapter,
            loaded_in: Some(loaded_in),
        })
    }

    /// Drops `name` from the cache (it is freed when its last generation ends).
    pub(crate) fn forget(&self, name: &str) -> bool {
        let removed = {
            let mut cached = self.lock_cached();
            cached
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| cached.remove(i))
        };
        removed.is_some()
    }

    fn touch(&self, name: &str) -> Option<Arc<Adapter>> {
        let mut cached = self.lock_cached();
        let i = cached.iter().position(|(n, _)| n == name)?;
        let entry = cached.remove(i);
        let adapter = Arc::clone(&entry.1);
        cached.push(entry);
        Some(adapter)
    }

    fn load(
        &self,
        model: &LlamaModel,
        architecture: &str,
        path: &Path,
    ) -> Result<Adapter, InferError> {
        if !path.is_file() {
            return Err(InferError::NotFound(path.to_owned()));
        }
        let meta = GgufMetadata::read(path)?;
        if !meta.is_adapter() {
            return Err(InferError::NotAdapter {
                path: path.to_owned(),
            });
        }
        let arch = meta.architecture().unwrap_or("unknown");
        if arch != architecture {
            return Err(InferError::ArchitectureMismatch {
                path: path.to_owned(),
                adapter: arch.to_owned(),
                model: architecture.to_owned(),
            });
        }
        let _graph = self.graph.write().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: a second `LlamaModel` value for the same llama.cpp model, never dropped
        // (`ManuallyDrop`), so the model is freed once, by its owner. The `&mut` that
        // `lora_adapter_init` takes is to this copy, not to the shared `LlamaModel`. What that
        // call mutates in llama.cpp is the model's adapter set, which the write lock held here
        // keeps every reader out of (module doc).
        let mut alias = ManuallyDrop::new(unsafe { std::ptr::read(model) });
        let handle = alias
            .lora_adapter_init(path)
            .map_err(|_| InferError::Load {
                path: path.to_owned(),
            })?;
        Ok(Adapter {
            handle: Mutex::new(handle),
            graph: Arc::clone(&self.graph),
        })
    }

    fn lock_pinned(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Adapter>>> {
        self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_cached(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<Adapter>)>> {
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

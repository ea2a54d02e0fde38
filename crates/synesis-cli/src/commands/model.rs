//! `synesis model …` and `synesis lora …`: the registry of what this device can run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_infer::tiny::{TinySpec, write_lora, write_model};
use synesis_infer::{GgufMetadata, Model, Settings};
use synesis_tunnel::Identity;

use super::Output;
use crate::cli::{LoraAddArgs, ModelAddArgs, ModelPullArgs};
use crate::paths::Paths;
use crate::pull::Reference;
use crate::pull::reference::CATALOG;
use crate::registry::{AdapterEntry, Config, ModelEntry, check_name, digest};

fn models_dir(paths: &Paths) -> PathBuf {
    paths.data.path.join("models")
}

fn adapters_dir(paths: &Paths) -> PathBuf {
    paths.data.path.join("adapters")
}

/// A path as the registry keeps it: absolute, so it works from any directory.
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{} cannot be opened", path.display()))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Where a model to register comes from.
pub(crate) enum Source<'a> {
    /// Write a tiny random model under this name into the data directory.
    Tiny(&'a str),
    /// A GGUF file the user has, and the name to give it (default: its file name).
    File {
        path: &'a Path,
        name: Option<String>,
    },
    /// A file in the store (`synesis model pull`), already digested.
    Pulled {
        fetched: &'a crate::pull::Fetched,
        name: String,
    },
}

/// Checks (by loading it) and registers a model; the first one becomes the default.
/// Returns its name, its entry, and whether it became the default.
pub(crate) fn register(
    paths: &Paths,
    source: Source<'_>,
) -> anyhow::Result<(String, ModelEntry, bool)> {
    let config_file = paths.config_file();
    let mut config = Config::load(&config_file)?;
    let mut known = None;
    let (name, path, tiny) = match source {
        Source::Tiny(name) => {
            check_name(name)?;
            if config.models.contains_key(name) {
                bail!("a model named {name:?} is already registered");
            }
            let dir = models_dir(paths);
            crate::secure_fs::private_dir(&dir)?;
            let path = dir.join(format!("{name}.gguf"));
            write_model(&path, TinySpec::TINY)
                .with_context(|| format!("cannot write {}", path.display()))?;
            crate::secure_fs::tighten(&[&path]);
            (name.to_owned(), path, true)
        }
        Source::File { path, name } => {
            let name = name.unwrap_or_else(|| stem(path));
            check_name(&name)?;
            (name, absolute(path)?, false)
        }
        Source::Pulled { fetched, name } => {
            check_name(&name)?;
            known = Some((fetched.sha256.clone(), fetched.size_bytes));
            (name, fetched.path.clone(), false)
        }
    };
    if config.models.contains_key(&name) {
        bail!("a model named {name:?} is already registered; `synesis model rm {name}` first");
    }
    // A real load: the file must be a GGUF model llama.cpp accepts, not just look like one.
    let model = Model::load(
        &path,
        Settings {
            gpu_layers: 0,
            ..Settings::default()
        },
    )?;
    let info = model.info().clone();
    drop(model);
    let (sha256, size_bytes) = match known {
        Some(known) => known,
        None => digest(&path)?,
    };
    let entry = ModelEntry {
        path,
        size_bytes,
        sha256,
        architecture: info.architecture,
        context_length: u64::from(info.context_length),
        tiny,
    };
    config.models.insert(name.clone(), entry.clone());
    let is_default = config.default_model.is_none();
    if is_default {
        config.default_model = Some(name.clone());
    }
    config.save(&config_file)?;
    Ok((name, entry, is_default))
}

pub(crate) fn add(out: &Output, paths: &Paths, args: &ModelAddArgs) -> anyhow::Result<()> {
    let source = match (&args.tiny, &args.path) {
        (Some(name), None) => Source::Tiny(name),
        (None, Some(path)) => Source::File {
            path,
            name: args.name.clone(),
        },
        _ => bail!("give a PATH to a GGUF model, or --tiny NAME to write a tiny one"),
    };
    let (name, entry, is_default) = register(paths, source)?;
    #[derive(Serialize)]
    struct View<'a> {
        name: &'a str,
        #[serde(flatten)]
        entry: &'a ModelEntry,
        default: bool,
    }
    out.report(
        &View {
            name: &name,
            entry: &entry,
            default: is_default,
        },
        || {
            format!(
                "added model {name}: {}\n",
                described(&entry.path.display().to_string(), &entry, is_default, "")
            )
        },
    )?;
    Ok(())
}

/// `WHERE (ARCH, N bytes, context N[EXTRA])[, the default]`.
fn described(place: &str, entry: &ModelEntry, is_default: bool, extra: &str) -> String {
    format!(
        "{place} ({}, {} bytes, context {}{extra}){}",
        entry.architecture,
        entry.size_bytes,
        entry.context_length,
        if is_default { ", the default" } else { "" }
    )
}

/// `synesis model pull`: fetch into the store (or find it there), then register.
pub(crate) async fn pull(out: &Output, paths: &Paths, args: &ModelPullArgs) -> anyhow::Result<()> {
    if args.list {
        return pull_list(out);
    }
    let Some(text) = &args.reference else {
        bail!("give a model to pull: `synesis model pull --list` shows the short names");
    };
    let reference = Reference::parse(text)?;
    let progress = if out.json() {
        crate::pull::Progress::Quiet
    } else {
        crate::pull::Progress::Stderr
    };
    let Pulled {
        fetched,
        name,
        entry,
        is_default,
        registered,
    } = pull_and_register(paths, &reference, args.name.clone(), progress).await?;
    #[derive(Serialize)]
    struct View<'a> {
        name: &'a str,
        #[serde(flatten)]
        entry: &'a ModelEntry,
        default: bool,
        /// False when this name already pointed to this content.
        registered: bool,
        pulled: &'a crate::pull::Fetched,
    }
    out.report(
        &View {
            name: &name,
            entry: &entry,
            default: is_default,
            registered,
            pulled: &fetched,
        },
        || {
            let how = if fetched.already_stored {
                "already stored".to_owned()
            } else if fetched.resumed_from_bytes > 0 {
                format!(
                    "resumed at {} bytes, {} more received, SHA-256 checked",
                    fetched.resumed_from_bytes, fetched.downloaded_bytes
                )
            } else {
                "SHA-256 checked".to_owned()
            };
            format!(
                "{} model {name}: {}\ntry it: synesis ask --model {name} \"Why is the sky blue?\"\n",
                if registered { "pulled" } else { "already have" },
                described(&fetched.source, &entry, is_default, &format!("; {how}")),
            )
        },
    )?;
    Ok(())
}

/// A model pulled and registered.
pub(crate) struct Pulled {
    pub(crate) fetched: crate::pull::Fetched,
    pub(crate) name: String,
    pub(crate) entry: ModelEntry,
    pub(crate) is_default: bool,
    /// Registered now (not already, with the same content).
    pub(crate) registered: bool,
}

/// Pulls `reference` into the store and registers it under `name` (default: the file's own
/// name). `synesis model pull` and the HTTP API's `/api/pull`.
pub(crate) async fn pull_and_register(
    paths: &Paths,
    reference: &Reference,
    name: Option<String>,
    progress: crate::pull::Progress,
) -> anyhow::Result<Pulled> {
    if let Some(name) = &name {
        check_name(name)?;
    }
    let fetched = crate::pull::fetch(paths, reference, progress).await?;
    let name = name.unwrap_or_else(|| fetched.default_name.clone());
    let config = Config::load(&paths.config_file())?;
    match config.models.get(&name) {
        Some(existing) if existing.sha256 == fetched.sha256 => Ok(Pulled {
            is_default: config.default_model.as_deref() == Some(name.as_str()),
            entry: existing.clone(),
            fetched,
            name,
            registered: false,
        }),
        Some(_) => bail!(
            "a model named {name:?} is already registered with other content; --name NAME \
             registers this one under another name (it is stored: pulling again is instant)"
        ),
        None => {
            let (name, entry, is_default) = register(
                paths,
                Source::Pulled {
                    fetched: &fetched,
                    name,
                },
            )?;
            Ok(Pulled {
                fetched,
                name,
                entry,
                is_default,
                registered: true,
            })
        }
    }
}

fn pull_list(out: &Output) -> anyhow::Result<()> {
    let rows: Vec<serde_json::Value> = CATALOG
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "repo": p.repo, "revision": p.revision, "file": p.file,
                "size_bytes": p.size_bytes, "sha256": p.sha256, "about": p.about,
            })
        })
        .collect();
    out.report(&rows, || {
        CATALOG
            .iter()
            .map(|p| {
                format!(
                    "{:<16} {:>5} MB  {}  (hf:{}/{})\n",
                    p.name,
                    p.size_bytes / 1_000_000,
                    p.about,
                    p.repo,
                    p.file
                )
            })
            .collect()
    })?;
    Ok(())
}

pub(crate) fn list(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let config = Config::load(&paths.config_file())?;
    #[derive(Serialize)]
    struct Row<'a> {
        name: &'a str,
        default: bool,
        #[serde(flatten)]
        entry: &'a ModelEntry,
    }
    let rows: Vec<Row<'_>> = config
        .models
        .iter()
        .map(|(name, entry)| Row {
            name,
            default: config.default_model.as_deref() == Some(name),
            entry,
        })
        .collect();
    out.report(&rows, || {
        if rows.is_empty() {
            return "no models; add one with `synesis model add PATH` or `synesis model add --tiny demo`\n".into();
        }
        rows.iter()
            .map(|r| {
                format!(
                    "{}{:<16} {:<8} ctx {:<6} {:>12} bytes  {}\n",
                    if r.default { "* " } else { "  " },
                    r.name,
                    r.entry.architecture,
                    r.entry.context_length,
                    r.entry.size_bytes,
                    r.entry.path.display()
                )
            })
            .collect()
    })?;
    Ok(())
}

pub(crate) fn remove(out: &Output, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let config_file = paths.config_file();
    let mut config = Config::load(&config_file)?;
    let Some(entry) = config.models.remove(name) else {
        bail!("no model named {name:?}");
    };
    if config.default_model.as_deref() == Some(name) {
        config.default_model = None;
    }
    config.save(&config_file)?;
    // A file Synesis wrote or pulled goes too once no other name points to it (the store
    // holds a file once, whatever names it has); a user's file stays where it is.
    if entry.path.starts_with(models_dir(paths))
        && !config.models.values().any(|m| m.path == entry.path)
    {
        let _ = std::fs::remove_file(&entry.path);
    }
    out.report(&serde_json::json!({"removed": name}), || {
        format!("removed model {name}\n")
    })?;
    Ok(())
}

pub(crate) fn set_default(out: &Output, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let config_file = paths.config_file();
    let mut config = Config::load(&config_file)?;
    if !config.models.contains_key(name) {
        bail!("no model named {name:?}; `synesis model list` shows them");
    }
    config.default_model = Some(name.to_owned());
    config.save(&config_file)?;
    out.report(&serde_json::json!({"default_model": name}), || {
        format!("default model: {name}\n")
    })?;
    Ok(())
}

pub(crate) fn lora_add(out: &Output, paths: &Paths, args: &LoraAddArgs) -> anyhow::Result<()> {
    check_name(&args.name)?;
    let config_file = paths.config_file();
    let mut config = Config::load(&config_file)?;
    if config.adapters.contains_key(&args.name) {
        bail!(
            "an adapter named {:?} is already registered; `synesis lora rm {}` first",
            args.name,
            args.name
        );
    }
    let base = match &args.base {
        Some(b) => Some(config.model(Some(b))?),
        None => config.model(None).ok(),
    };
    let path = if args.tiny {
        let Some((base_name, base_entry)) = base else {
            bail!(
                "--tiny needs a tiny base model: --base MODEL (make one with `synesis model add --tiny NAME`)"
            );
        };
        if !base_entry.tiny {
            bail!("--tiny adapters fit only tiny models, and {base_name} is not one");
        }
        let dir = adapters_dir(paths);
        crate::secure_fs::private_dir(&dir)?;
        let path = dir.join(format!("{}.gguf", args.name));
        write_lora(&path, TinySpec::TINY, 7)
            .with_context(|| format!("cannot write {}", path.display()))?;
        crate::secure_fs::tighten(&[&path]);
        path
    } else {
        match &args.path {
            Some(p) => absolute(p)?,
            None => bail!("give a PATH to a LoRA adapter (GGUF), or --tiny"),
        }
    };
    let meta = GgufMetadata::read(&path)?;
    if !meta.is_adapter() {
        bail!(
            "{} is not an adapter: its general.type is not \"adapter\"",
            path.display()
        );
    }
    let architecture = meta.architecture().unwrap_or("unknown").to_owned();
    if let Some((base_name, base_entry)) = base
        && base_entry.architecture != architecture
    {
        bail!(
            "the adapter is for {architecture}, but {base_name} is {}",
            base_entry.architecture
        );
    }
    let (sha256, size_bytes) = digest(&path)?;
    let entry = AdapterEntry {
        path,
        size_bytes,
        sha256,
        architecture,
        base: base.map(|(n, _)| n.to_owned()),
    };
    config.adapters.insert(args.name.clone(), entry.clone());
    config.save(&config_file)?;
    #[derive(Serialize)]
    struct View<'a> {
        name: &'a str,
        #[serde(flatten)]
        entry: &'a AdapterEntry,
    }
    out.report(
        &View {
            name: &args.name,
            entry: &entry,
        },
        || {
            format!(
                "added adapter {}: {} ({}{})\n",
                args.name,
                entry.path.display(),
                entry.architecture,
                entry
                    .base
                    .as_deref()
                    .map(|b| format!(", for {b}"))
                    .unwrap_or_default()
            )
        },
    )?;
    Ok(())
}

/// How long `synesis lora list` waits for the cloud to say which adapters it holds: listing
/// stays quick offline, and says `?` instead.
const ON_CLOUD_WITHIN: Duration = Duration::from_secs(2);

/// The digests (hex) of the adapters the account holds on the cloud, or `None` when this device
/// is not enrolled or the cloud does not answer within [`ON_CLOUD_WITHIN`].
async fn cloud_digests(paths: &Paths) -> Option<HashSet<String>> {
    let home = paths.identity_home().ok()?;
    if !matches!(Identity::load(&home), Ok(Some(_))) {
        return None;
    }
    match tokio::time::timeout(ON_CLOUD_WITHIN, super::push::cloud_adapters(paths)).await {
        Ok(Ok(adapters)) => Some(adapters.iter().map(|a| a.sha256.to_string()).collect()),
        Ok(Err(e)) => {
            tracing::info!("the cloud's adapters are unknown: {e:#}");
            None
        }
        Err(_) => {
            tracing::info!("the cloud did not list its adapters within {ON_CLOUD_WITHIN:?}");
            None
        }
    }
}

pub(crate) async fn lora_list(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let config = Config::load(&paths.config_file())?;
    let on_cloud = if config.adapters.is_empty() {
        None
    } else {
        cloud_digests(paths).await
    };
    #[derive(Serialize)]
    struct Row<'a> {
        name: &'a str,
        #[serde(flatten)]
        entry: &'a AdapterEntry,
        /// The cloud holds this content (by the digest recorded at `lora add`); `null` when it
        /// could not be asked.
        on_cloud: Option<bool>,
    }
    let rows: Vec<Row<'_>> = config
        .adapters
        .iter()
        .map(|(name, entry)| Row {
            name,
            entry,
            on_cloud: on_cloud.as_ref().map(|d| d.contains(&entry.sha256)),
        })
        .collect();
    out.report(&rows, || {
        if rows.is_empty() {
            return "no adapters; add one with `synesis lora add PATH --name NAME`\n".into();
        }
        rows.iter()
            .map(|r| {
                format!(
                    "{:<16} {:<8} base {:<12} cloud {:<3} {}\n",
                    r.name,
                    r.entry.architecture,
                    r.entry.base.as_deref().unwrap_or("-"),
                    match r.on_cloud {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "?",
                    },
                    r.entry.path.display()
                )
            })
            .collect()
    })?;
    Ok(())
}

pub(crate) fn lora_remove(out: &Output, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let config_file = paths.config_file();
    let mut config = Config::load(&config_file)?;
    let Some(entry) = config.adapters.remove(name) else {
        bail!("no adapter named {name:?}");
    };
    config.save(&config_file)?;
    if entry.path.starts_with(adapters_dir(paths)) {
        let _ = std::fs::remove_file(&entry.path);
    }
    out.report(&serde_json::json!({"removed": name}), || {
        format!("removed adapter {name}\n")
    })?;
    Ok(())
}

//! `synesis model pull`: a GGUF model from the Hugging Face Hub (or any HTTPS URL) into a
//! content-addressed store, resumable and verified, then registered like `model add`.
//!
//! The Hub's protocol, as its own clients speak it:
//! - `GET {HF_ENDPOINT}/{repo}/resolve/{revision}/{file}` answers `302` to a CDN URL, with the
//!   file's SHA-256 in `X-Linked-Etag` (LFS files) and its size in `X-Linked-Size`;
//! - the CDN honours `Range: bytes=N-` (`206`), so a partial file resumes where it stopped;
//! - `GET {HF_ENDPOINT}/api/models/{repo}` lists the repository's files (`siblings`), from which
//!   `OWNER/REPO:QUANT` chooses one;
//! - a gated or private repository answers `401` without `Authorization: Bearer $HF_TOKEN`.
//!
//! The token goes only to the endpoint's own origin, never to the host a redirect names.
//! Redirects are followed here (at most [`REDIRECTS_MAX`]), never from `https` to `http`.
//!
//! On disk, under the data directory:
//! - `models/partial/<sha256 of the URL>.part`: a download in progress (the same command again
//!   resumes it with `Range`);
//! - `models/blobs/sha256-<hex>.gguf`: finished files, named by their content, so the same file
//!   pulled twice or under two names is stored once (`synesis model rm` frees it when no name
//!   points to it any more).
//!
//! A file is registered only after its SHA-256 matched what the Hub published (or the catalog
//! pinned), its header read as a GGUF model (not an adapter), and llama.cpp loaded it.

pub(crate) mod reference;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use reqwest::{StatusCode, Url, header};
use sha2::Digest as _;
use synesis_infer::{GgufMetadata, MetadataError};

pub(crate) use reference::Reference;
use reference::choose_file;

use crate::paths::Paths;

/// Redirects followed at most (the Hub uses one).
const REDIRECTS_MAX: usize = 5;
/// Room left free on the disk beyond the file itself.
const DISK_MARGIN_BYTES: u64 = 64 << 20;
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How often a download of unknown size looks at the free disk again.
const UNSIZED_CHECK_BYTES: u64 = 64 << 20;

/// Where models come from: the Hub's endpoint (`HF_ENDPOINT`), its token (`HF_TOKEN`), one client.
pub(crate) struct Hub {
    /// The endpoint's URL, for its origin (the only one the token is sent to).
    endpoint: Url,
    /// The endpoint as paths are appended to it: no trailing `/`.
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// A file about to be fetched.
#[derive(Debug)]
struct Wanted {
    url: Url,
    /// The path or name it is known by (for messages and the default model name).
    file: String,
    /// What the catalog pinned, checked against what the Hub says and what arrives.
    pinned_sha256: Option<String>,
    pinned_size: Option<u64>,
}

/// A pull's outcome, as `--json` reports it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Fetched {
    /// The store's file.
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) size_bytes: u64,
    /// Where it came from (after choosing the file; before redirects).
    pub(crate) source: String,
    /// The name it is registered under unless `--name` says otherwise.
    #[serde(skip)]
    pub(crate) default_name: String,
    /// Bytes received by this command (0 when the store already held the file).
    pub(crate) downloaded_bytes: u64,
    /// Bytes a partial file held before this command resumed it.
    pub(crate) resumed_from_bytes: u64,
    /// The store already held this content.
    pub(crate) already_stored: bool,
}

impl Hub {
    pub(crate) fn from_env() -> anyhow::Result<Hub> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let base = endpoint.trim().trim_end_matches('/').to_owned();
        let endpoint =
            Url::parse(&base).with_context(|| format!("HF_ENDPOINT={endpoint:?} is not a URL"))?;
        if !matches!(endpoint.scheme(), "https" | "http") {
            bail!("HF_ENDPOINT={endpoint} is not an http(s) URL");
        }
        let token = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let tls = synesis_wire::tls::web_client_config().context("cannot set up TLS")?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("synesis/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up HTTP")?;
        Ok(Hub {
            endpoint,
            base,
            token,
            client,
        })
    }

    fn resolve_url(&self, repo: &str, revision: &str, file: &str) -> anyhow::Result<Url> {
        let text = format!("{}/{repo}/resolve/{revision}/{file}", self.base);
        Url::parse(&text).with_context(|| format!("{text} is not a URL"))
    }

    /// One GET of `url`, with the token when `url` is the endpoint's origin.
    async fn get(&self, url: &Url, from: u64) -> anyhow::Result<reqwest::Response> {
        let mut request = self.client.get(url.clone());
        if from > 0 {
            request = request.header(header::RANGE, format!("bytes={from}-"));
        }
        if let Some(token) = &self.token
            && url.origin() == self.endpoint.origin()
        {
            request = request.bearer_auth(token);
        }
        request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", without_query(url)))
    }

    /// The repository's file names (`GET /api/models/{repo}`).
    async fn files(&self, repo: &str) -> anyhow::Result<Vec<String>> {
        let url = Url::parse(&format!("{}/api/models/{repo}", self.base))
            .context("not a repository URL")?;
        let response = self.get(&url, 0).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.refusal(status, repo));
        }
        #[derive(serde::Deserialize)]
        struct Listing {
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        let listing: Listing = response
            .json()
            .await
            .with_context(|| format!("{repo}: the Hub's file list did not parse"))?;
        Ok(listing.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// A refusal as the user reads it: what it means, what to do.
    fn refusal(&self, status: StatusCode, what: &str) -> anyhow::Error {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                if self.token.is_some() {
                    anyhow::anyhow!(
                        "{what} is gated or private and HF_TOKEN was refused ({status}): \
                         check that the token's account accepted the model's licence on the Hub"
                    )
                } else {
                    anyhow::anyhow!(
                        "{what} is gated or private ({status}): accept its licence on the Hub, \
                         then set HF_TOKEN to an access token (https://huggingface.co/settings/tokens)"
                    )
                }
            }
            StatusCode::NOT_FOUND => anyhow::anyhow!("{what}: not found ({status})"),
            _ => anyhow::anyhow!("{what}: the server answered {status}"),
        }
    }

    /// What `reference` names, as one file to fetch.
    async fn wanted(&self, reference: &Reference) -> anyhow::Result<Wanted> {
        Ok(match reference {
            Reference::HubFile {
                repo,
                revision,
                file,
                pinned,
            } => Wanted {
                url: self.resolve_url(repo, revision, file)?,
                file: file.clone(),
                pinned_sha256: pinned.map(|p| p.sha256.to_owned()),
                pinned_size: pinned.map(|p| p.size_bytes),
            },
            Reference::HubRepo {
                repo,
                revision,
                quant,
            } => {
                let files = self.files(repo).await?;
                let names: Vec<&str> = files.iter().map(String::as_str).collect();
                let file = choose_file(&names, quant, repo)?.to_owned();
                Wanted {
                    url: self.resolve_url(repo, revision, &file)?,
                    file,
                    pinned_sha256: None,
                    pinned_size: None,
                }
            }
            Reference::Url(text) => {
                let url = Url::parse(text).with_context(|| format!("{text} is not a URL"))?;
                Wanted {
                    file: url.path().to_owned(),
                    url,
                    pinned_sha256: None,
                    pinned_size: None,
                }
            }
        })
    }

    /// Follows redirects from `url` to the response that carries the body, asking for the
    /// bytes from `from` on. Returns it with what the hops said about the file; or no response
    /// when a hop published a SHA-256 that `stored` already holds (nothing is fetched then).
    async fn open(
        &self,
        url: &Url,
        from: u64,
        stored: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(Option<reqwest::Response>, Published)> {
        let mut published = Published::default();
        let mut at = url.clone();
        for _ in 0..=REDIRECTS_MAX {
            let response = self.get(&at, from).await?;
            published.read(response.headers());
            if published.sha256.as_deref().is_some_and(&stored) {
                return Ok((None, published));
            }
            let status = response.status();
            if !status.is_redirection() {
                if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
                    return Ok((Some(response), published));
                }
                return Err(self.refusal(status, &without_query(url)));
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .with_context(|| {
                    format!("{}: a redirect without a Location", without_query(&at))
                })?;
            let next = at
                .join(location)
                .with_context(|| format!("{}: a redirect to {location:?}", without_query(&at)))?;
            if at.scheme() == "https" && next.scheme() != "https" {
                bail!(
                    "{}: refused a redirect from https to {}",
                    without_query(url),
                    next.scheme()
                );
            }
            at = next;
        }
        bail!(
            "{}: more than {REDIRECTS_MAX} redirects",
            without_query(url)
        )
    }
}

/// What the server said about the file before its bytes: the Hub's `X-Linked-Etag` (the
/// SHA-256 of an LFS file) and `X-Linked-Size`.
#[derive(Debug, Default)]
struct Published {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Published {
    fn read(&mut self, headers: &header::HeaderMap) {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(tag) = text("x-linked-etag") {
            let tag = tag.trim().trim_start_matches("W/").trim_matches('"');
            if tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.sha256 = Some(tag.to_ascii_lowercase());
            }
        }
        if let Some(size) = text("x-linked-size").and_then(|s| s.trim().parse().ok()) {
            self.size = Some(size);
        }
    }
}

/// A URL as printed: no query (a CDN's query carries its signature).
fn without_query(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn store_dir(paths: &Paths) -> PathBuf {
    paths.data.path.join("models")
}

/// The store's file for content with this SHA-256.
pub(crate) fn blob_path(paths: &Paths, sha256: &str) -> PathBuf {
    store_dir(paths)
        .join("blobs")
        .join(format!("sha256-{sha256}.gguf"))
}

/// Told what a pull is doing (`downloading`, `verifying`), bytes done, of how many.
pub(crate) type Report = std::sync::Arc<dyn Fn(&'static str, u64, Option<u64>) + Send + Sync>;

/// Where a pull says how far it is.
#[derive(Clone)]
pub(crate) enum Progress {
    Quiet,
    /// A bar on a terminal, a line per tenth otherwise.
    Stderr,
    /// Told to a function.
    To(Report),
}

/// Fetches what `reference` names into the store (or finds it there), saying how far it is.
pub(crate) async fn fetch(
    paths: &Paths,
    reference: &Reference,
    progress: Progress,
) -> anyhow::Result<Fetched> {
    let hub = Hub::from_env()?;
    let wanted = hub.wanted(reference).await?;
    let source = without_query(&wanted.url);
    let default_name = reference.default_name(&wanted.file);

    let partial_dir = store_dir(paths).join("partial");
    crate::secure_fs::private_dir(&partial_dir)?;
    crate::secure_fs::private_dir(&store_dir(paths).join("blobs"))?;
    let key = hex(&sha2::Sha256::digest(wanted.url.as_str().as_bytes()));
    let partial = partial_dir.join(format!("{key}.part"));
    let held = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);

    let in_store = |sha: &str| blob_path(paths, sha).exists();
    let (response, published) = hub.open(&wanted.url, held, in_store).await?;
    let expected_sha = match (&wanted.pinned_sha256, &published.sha256) {
        (Some(pinned), Some(hub)) if pinned != hub => bail!(
            "{source}: the Hub publishes SHA-256 {hub}, not the {pinned} this name is pinned \
             to; the file changed upstream, so it is not pulled"
        ),
        (Some(pinned), _) => Some(pinned.clone()),
        (None, hub) => hub.clone(),
    };
    if let Some(sha) = &expected_sha {
        let blob = blob_path(paths, sha);
        if blob.exists() {
            drop(response);
            let _ = std::fs::remove_file(&partial);
            let size_bytes = std::fs::metadata(&blob)?.len();
            return Ok(Fetched {
                path: blob,
                sha256: sha.clone(),
                size_bytes,
                source,
                default_name,
                downloaded_bytes: 0,
                resumed_from_bytes: 0,
                already_stored: true,
            });
        }
    }

    let Some(mut response) = response else {
        bail!("{source}: the store lost the file while it was being pulled; run it again");
    };
    let status = response.status();
    let length = response.content_length();
    let expected_size = wanted.pinned_size.or(published.size).or(match status {
        StatusCode::OK => length,
        StatusCode::PARTIAL_CONTENT => length.map(|l| l + held),
        _ => None,
    });

    // Where the body starts: a 206 continues the partial file, a 200 starts it again, a 416
    // says the partial file is already whole (or is not this file: verified below either way).
    let start = match status {
        StatusCode::PARTIAL_CONTENT => {
            let from = content_range_start(response.headers());
            if from != Some(held) {
                bail!("{source}: asked for bytes from {held}, the server sent from {from:?}");
            }
            held
        }
        StatusCode::RANGE_NOT_SATISFIABLE => held,
        _ => 0,
    };
    if let Some(size) = expected_size {
        check_free_disk(&partial_dir, size.saturating_sub(start))?;
    }
    let mut file = crate::secure_fs::private_file_options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    file.set_len(start)?;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(start))?;
        file
    });

    let mut meter = Meter::new(&progress, expected_size, start);
    let mut received = 0u64;
    if status != StatusCode::RANGE_NOT_SATISFIABLE {
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    file.flush()?;
                    meter.finish();
                    bail!(
                        "the download was cut after {} of {} ({:#}); run the same command \
                         again to resume from there",
                        mib(start + received),
                        expected_size.map_or_else(|| "?".into(), mib),
                        anyhow::Error::new(e)
                    );
                }
            };
            file.write_all(&chunk)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            received += chunk.len() as u64;
            if let Some(size) = expected_size
                && start + received > size
            {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                bail!("{source}: the server sent more than the {size} bytes it announced");
            }
            // A server that announced no size could fill the disk: look again every so often.
            if expected_size.is_none()
                && received % UNSIZED_CHECK_BYTES < chunk.len() as u64
                && let Err(e) = check_free_disk(&partial_dir, 0)
            {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(e.context(format!("{source} announced no size")));
            }
            meter.at(start + received);
        }
    }
    file.flush()?;
    file.get_ref().sync_all()?;
    drop(file);
    meter.finish();

    let size_bytes = std::fs::metadata(&partial)?.len();
    if let Some(size) = expected_size
        && size_bytes != size
    {
        let _ = std::fs::remove_file(&partial);
        bail!("{source}: {size_bytes} bytes arrived where {size} were announced; run it again");
    }
    let sha256 = digest_with_progress(&partial, &progress)?;
    if let Some(expected) = &expected_sha
        && *expected != sha256
    {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "{source}: the file's SHA-256 is {sha256}, not the {expected} published for it; \
             the download is damaged and was deleted (run the same command to fetch it again)"
        );
    }
    if let Err(why) = check_model(&partial) {
        let _ = std::fs::remove_file(&partial);
        bail!("{source}: {why}; nothing was registered");
    }
    let blob = blob_path(paths, &sha256);
    if blob.exists() {
        let _ = std::fs::remove_file(&partial);
    } else {
        std::fs::rename(&partial, &blob)
            .with_context(|| format!("cannot move the model into {}", blob.display()))?;
    }
    Ok(Fetched {
        path: blob,
        sha256,
        size_bytes,
        source,
        default_name,
        downloaded_bytes: received,
        resumed_from_bytes: start,
        already_stored: false,
    })
}

/// `bytes N-M/T` → N.
fn content_range_start(headers: &header::HeaderMap) -> Option<u64> {
    let text = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = text.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// A GGUF model, not an adapter, not something else (an HTML page, a truncated file).
fn check_model(path: &Path) -> Result<(), String> {
    match GgufMetadata::read(path) {
        Ok(meta) if meta.is_adapter() => Err(
            "it is a LoRA adapter (general.type = adapter), not a model: `synesis lora add` \
             registers adapters"
                .into(),
        ),
        Ok(meta) if meta.architecture().is_none() => {
            Err("its GGUF header names no architecture (general.architecture)".into())
        }
        Ok(_) => Ok(()),
        Err(MetadataError::NotGguf(_)) => {
            Err("it is not a GGUF file (it does not start with \"GGUF\")".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Refuses to start when the disk holding `dir` has less than `need` bytes (and a margin) free.
fn check_free_disk(dir: &Path, need: u64) -> anyhow::Result<()> {
    let stat =
        rustix::fs::statvfs(dir).with_context(|| format!("cannot stat {}", dir.display()))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < need.saturating_add(DISK_MARGIN_BYTES) {
        bail!(
            "not enough free disk for the model: it needs {} more, and {} holds {} free",
            mib(need),
            dir.display(),
            mib(free)
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The SHA-256 of a file, with the bar saying "verifying".
fn digest_with_progress(path: &Path, progress: &Progress) -> anyhow::Result<String> {
    let total = std::fs::metadata(path)?.len();
    let mut meter = Meter::new(progress, Some(total), 0);
    meter.message("verifying");
    let (sha256, _) = crate::registry::digest_with(path, &mut |done| meter.at(done))?;
    meter.finish();
    Ok(sha256)
}

/// Progress on stderr: a bar (bytes, rate, time left) on a terminal, a line per tenth otherwise,
/// nothing when not asked; or each step told to a function.
struct Meter {
    bar: Option<ProgressBar>,
    lines: bool,
    to: Option<Report>,
    total: Option<u64>,
    last_tenth: u64,
    started: Instant,
    label: &'static str,
}

impl Meter {
    fn new(progress: &Progress, total: Option<u64>, at: u64) -> Meter {
        let stderr = matches!(progress, Progress::Stderr);
        let terminal = stderr && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = crate::commands::bytes_bar(total);
            bar.set_message("downloading");
            bar.set_position(at);
            bar.reset_eta();
            bar
        });
        Meter {
            bar,
            lines: stderr && !terminal,
            to: match progress {
                Progress::To(to) => Some(std::sync::Arc::clone(to)),
                _ => None,
            },
            total,
            last_tenth: total.map_or(0, |t| at.saturating_mul(10) / t.max(1)),
            started: Instant::now(),
            label: "downloading",
        }
    }

    fn message(&mut self, label: &'static str) {
        self.label = label;
        if let Some(bar) = &self.bar {
            bar.set_message(label);
        }
    }

    fn at(&mut self, done: u64) {
        if let Some(to) = &self.to {
            to(self.label, done, self.total);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if self.lines
            && let Some(total) = self.total
        {
            let tenth = done.saturating_mul(10) / total.max(1);
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                eprintln!(
                    "synesis: {} {} of {} ({}%, {:.1} s)",
                    self.label,
                    mib(done),
                    mib(total),
                    tenth * 10,
                    secs
                );
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

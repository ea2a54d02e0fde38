//! What `synesis model pull REF` names, before any network: a short name from [`CATALOG`], a
//! Hugging Face file or repository, or an `https://` URL. Pure: parsed and tested here, fetched
//! in [`super`].

use anyhow::bail;

/// The quantisation chosen when a repository is named without one (llama.cpp's `-hf` default).
pub(crate) const DEFAULT_QUANT: &str = "Q4_K_M";

/// A model the catalog pins: the exact Hub file, its size and SHA-256. A pull checks both, so a
/// short name always means these bytes, whatever the repository holds later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pinned {
    pub(crate) name: &'static str,
    pub(crate) repo: &'static str,
    pub(crate) revision: &'static str,
    pub(crate) file: &'static str,
    pub(crate) size_bytes: u64,
    pub(crate) sha256: &'static str,
    /// One line for `synesis model pull --help` and the first-run hint.
    pub(crate) about: &'static str,
}

/// The short names. Instruct-tuned models from their publishers (or the ggml project's own
/// conversions), with licences that allow this use.
/// Each pinned at a commit, so a name means the same bytes for ever.
pub(crate) const CATALOG: &[Pinned] = &[
    Pinned {
        name: "gemma3:270m",
        repo: "ggml-org/gemma-3-270m-it-GGUF",
        revision: "e7647be17ae1108f2f605ed061ca0608b171afff",
        file: "gemma-3-270m-it-Q8_0.gguf",
        size_bytes: 291_545_600,
        sha256: "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3",
        about: "Google Gemma 3 270M instruct, Q8_0 (Gemma Terms of Use)",
    },
    Pinned {
        name: "qwen2.5:0.5b",
        repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        revision: "9217f5db79a29953eb74d5343926648285ec7e67",
        file: "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        size_bytes: 491_400_032,
        sha256: "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db",
        about: "Qwen2.5 0.5B instruct, Q4_K_M (Apache-2.0)",
    },
    Pinned {
        name: "qwen3:0.6b",
        repo: "Qwen/Qwen3-0.6B-GGUF",
        revision: "23749fefcc72300e3a2ad315e1317431b06b590a",
        file: "Qwen3-0.6B-Q8_0.gguf",
        size_bytes: 639_446_688,
        sha256: "9465e63a22add5354d9bb4b99e90117043c7124007664907259bd16d043bb031",
        about: "Qwen3 0.6B, Q8_0 (Apache-2.0)",
    },
    Pinned {
        name: "smollm2:360m",
        repo: "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF",
        revision: "593b5a2e04c8f3e4ee880263f93e0bd2901ad47f",
        file: "smollm2-360m-instruct-q8_0.gguf",
        size_bytes: 386_404_992,
        sha256: "48ab3034d0dd401fbc721eb1df3217902fee7dab9078992d66431f09b7750201",
        about: "SmolLM2 360M instruct, Q8_0 (Apache-2.0)",
    },
    Pinned {
        name: "smollm2:135m",
        repo: "bartowski/SmolLM2-135M-Instruct-GGUF",
        revision: "09816acd5d99df7be770d85ea30822623dab342c",
        file: "SmolLM2-135M-Instruct-Q4_K_M.gguf",
        size_bytes: 105_454_432,
        sha256: "2e8040ceae7815abe0dcb3540b9995eaa1fa0d2ca9e797d0a635ae4433c68c2d",
        about: "SmolLM2 135M instruct, Q4_K_M (Apache-2.0)",
    },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference {
    /// One file of a Hub repository (`hf:OWNER/REPO/FILE.gguf`, or a catalog name).
    HubFile {
        repo: String,
        revision: String,
        file: String,
        pinned: Option<Pinned>,
    },
    /// A repository and a quantisation (`OWNER/REPO:QUANT`, `hf.co/OWNER/REPO:QUANT`): the file
    /// is chosen from the repository's list.
    HubRepo {
        repo: String,
        revision: String,
        quant: String,
    },
    /// Any HTTPS URL of a GGUF file.
    Url(String),
}

impl Reference {
    pub(crate) fn parse(text: &str) -> anyhow::Result<Reference> {
        let text = text.trim();
        if let Some(pinned) = CATALOG.iter().find(|p| p.name == text) {
            return Ok(Reference::HubFile {
                repo: pinned.repo.to_owned(),
                revision: pinned.revision.to_owned(),
                file: pinned.file.to_owned(),
                pinned: Some(*pinned),
            });
        }
        if text.starts_with("https://") {
            return Ok(Reference::Url(text.to_owned()));
        }
        if text.starts_with("http://") {
            bail!("{text}: only https:// URLs are pulled (a mirror over plain HTTP: HF_ENDPOINT)");
        }
        if let Some(rest) = text.strip_prefix("hf:") {
            // hf:OWNER/REPO/PATH/TO/FILE.gguf
            let mut parts = rest.splitn(3, '/');
            let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("{text}: an hf: reference is hf:OWNER/REPO/FILE.gguf");
            };
            check_repo(owner, repo, text)?;
            if !file.ends_with(".gguf") || file.split('/').any(|p| p.is_empty() || p == "..") {
                bail!("{text}: the file must be a .gguf path inside the repository");
            }
            return Ok(Reference::HubFile {
                repo: format!("{owner}/{repo}"),
                revision: "main".into(),
                file: file.to_owned(),
                pinned: None,
            });
        }
        // OWNER/REPO[:QUANT], as llama.cpp's -hf and Ollama's hf.co/… take it.
        let bare = text
            .strip_prefix("hf.co/")
            .or_else(|| text.strip_prefix("huggingface.co/"))
            .unwrap_or(text);
        let (repo, quant) = match bare.split_once(':') {
            Some((repo, quant)) => (repo, quant),
            None => (bare, DEFAULT_QUANT),
        };
        let Some((owner, name)) = repo.split_once('/') else {
            bail!(
                "{text:?} is not a known model name ({}), an hf:OWNER/REPO/FILE.gguf, an \
                 OWNER/REPO[:QUANT] or an https:// URL",
                catalog_names()
            );
        };
        check_repo(owner, name, text)?;
        if quant.is_empty()
            || !quant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            bail!("{text}: {quant:?} is not a quantisation (e.g. Q4_K_M, Q8_0)");
        }
        Ok(Reference::HubRepo {
            repo: repo.to_owned(),
            revision: "main".into(),
            quant: quant.to_owned(),
        })
    }

    /// The name a pulled model is registered under when `--name` is not given.
    pub(crate) fn default_name(&self, file: &str) -> String {
        if let Reference::HubFile {
            pinned: Some(p), ..
        } = self
        {
            return p.name.to_owned();
        }
        let base = file.rsplit('/').next().unwrap_or(file);
        let base = base.split(['?', '#']).next().unwrap_or(base);
        base.strip_suffix(".gguf").unwrap_or(base).to_owned()
    }
}

/// The catalog's names, for messages.
pub(crate) fn catalog_names() -> String {
    let names: Vec<&str> = CATALOG.iter().map(|p| p.name).collect();
    if names.is_empty() {
        "none yet".into()
    } else {
        names.join(", ")
    }
}

/// Hub repository names: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn check_repo(owner: &str, name: &str, text: &str) -> anyhow::Result<()> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !ok(owner) || !ok(name) {
        bail!("{text}: {owner}/{name} is not a Hugging Face repository name");
    }
    Ok(())
}

/// The `.gguf` file of `files` (a repository's list) with quantisation `quant`: the quant must
/// stand alone in the name (`Q4_K` does not choose `…Q4_K_M.gguf`); projector files (`mmproj`)
/// are never chosen; a model split into parts is refused, saying so.
pub(crate) fn choose_file<'a>(
    files: &[&'a str],
    quant: &str,
    repo: &str,
) -> anyhow::Result<&'a str> {
    let wanted = quant.to_ascii_uppercase();
    let matches: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| f.ends_with(".gguf") && !f.to_ascii_lowercase().contains("mmproj"))
        .filter(|f| stands_alone(&f.to_ascii_uppercase(), &wanted))
        .collect();
    if let Some(split) = matches.iter().find(|f| f.contains("-of-")) {
        bail!(
            "{repo}: {split} is one part of a model split into several files; pulling split \
             models is not supported yet"
        );
    }
    let mut matches = matches;
    matches.sort_by_key(|f| (f.matches('/').count(), f.len()));
    match matches.first() {
        Some(f) => Ok(f),
        None => {
            let mut quants: Vec<String> = files
                .iter()
                .filter(|f| f.ends_with(".gguf") && !f.to_ascii_lowercase().contains("mmproj"))
                .filter_map(|f| quant_of(f))
                .collect();
            quants.sort();
            quants.dedup();
            if quants.is_empty() {
                bail!("{repo} has no GGUF model files");
            }
            bail!(
                "{repo} has no {quant} file; it has: {} (pull {repo}:QUANT)",
                quants.join(", ")
            )
        }
    }
}

fn stands_alone(haystack: &str, needle: &str) -> bool {
    let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    haystack.match_indices(needle).any(|(at, _)| {
        boundary(haystack[..at].chars().next_back())
            && boundary(haystack[at + needle.len()..].chars().next())
    })
}

/// The quantisation a file name carries (`…-Q4_K_M.gguf` → `Q4_K_M`), for listing.
fn quant_of(file: &str) -> Option<String> {
    let stem = file.rsplit('/').next()?.strip_suffix(".gguf")?;
    let last = stem.rsplit(['-', '.']).next()?;
    let upper = last.to_ascii_uppercase();
    let looks = ["Q", "IQ", "F16", "BF16", "F32", "TQ"]
        .iter()
        .any(|p| upper.starts_with(p));
    looks.then_some(upper)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_reference_parses() {
        assert_eq!(
            Reference::parse("hf:acme/tiny-GGUF/sub/tiny-Q8_0.gguf").unwrap(),
            Reference::HubFile {
                repo: "acme/tiny-GGUF".into(),
                revision: "main".into(),
                file: "sub/tiny-Q8_0.gguf".into(),
                pinned: None
            }
        );
        for text in ["acme/tiny-GGUF:q8_0", "hf.co/acme/tiny-GGUF:q8_0"] {
            assert_eq!(
                Reference::parse(text).unwrap(),
                Reference::HubRepo {
                    repo: "acme/tiny-GGUF".into(),
                    revision: "main".into(),
                    quant: "q8_0".into()
                }
            );
        }
        assert_eq!(
            Reference::parse("huggingface.co/acme/tiny-GGUF").unwrap(),
            Reference::HubRepo {
                repo: "acme/tiny-GGUF".into(),
                revision: "main".into(),
                quant: DEFAULT_QUANT.into()
            }
        );
        assert_eq!(
            Reference::parse("https://example.org/m.gguf").unwrap(),
            Reference::Url("https://example.org/m.gguf".into())
        );
        for p in CATALOG {
            assert!(matches!(
                Reference::parse(p.name).unwrap(),
                Reference::HubFile {
                    pinned: Some(_),
                    ..
                }
            ));
        }
    }

    #[test]
    fn what_is_not_a_reference_is_refused_saying_what_is() {
        for bad in [
            "http://example.org/m.gguf",
            "hf:acme/tiny",
            "hf:acme/tiny/../x.gguf",
            "hf:acme/tiny/readme.md",
            "gemma",
            "acme/tiny:Q4 K",
            "../x/y",
        ] {
            let err = Reference::parse(bad).unwrap_err().to_string();
            assert!(!err.is_empty(), "{bad}");
        }
        let err = Reference::parse("nonsense").unwrap_err().to_string();
        assert!(err.contains("OWNER/REPO[:QUANT]"), "{err}");
    }

    #[test]
    fn a_quantisation_chooses_the_file_where_it_stands_alone() {
        let files = [
            "README.md",
            "m-Q4_K_M.gguf",
            "m-Q4_K_S.gguf",
            "m-IQ4_XS.gguf",
            "m-Q8_0.gguf",
            "mmproj-m-Q8_0.gguf",
        ];
        assert_eq!(choose_file(&files, "q4_k_m", "r").unwrap(), "m-Q4_K_M.gguf");
        assert_eq!(choose_file(&files, "Q8_0", "r").unwrap(), "m-Q8_0.gguf");
        let err = choose_file(&files, "Q4_K", "r").unwrap_err().to_string();
        assert!(err.contains("IQ4_XS, Q4_K_M, Q4_K_S, Q8_0"), "{err}");
        let split = [
            "m-Q4_K_M-00001-of-00002.gguf",
            "m-Q4_K_M-00002-of-00002.gguf",
        ];
        let err = choose_file(&split, "Q4_K_M", "r").unwrap_err().to_string();
        assert!(err.contains("split"), "{err}");
        assert!(choose_file(&["README.md"], "Q4_K_M", "r").is_err());
    }

    #[test]
    fn a_pulled_model_is_named_after_its_file_or_its_short_name() {
        let r = Reference::parse("acme/tiny-GGUF:Q8_0").unwrap();
        assert_eq!(r.default_name("sub/tiny-Q8_0.gguf"), "tiny-Q8_0");
        let u = Reference::parse("https://example.org/a/b.gguf?download=1").unwrap();
        assert_eq!(
            u.default_name("https://example.org/a/b.gguf?download=1"),
            "b"
        );
        for p in CATALOG {
            assert_eq!(
                Reference::parse(p.name).unwrap().default_name(p.file),
                p.name
            );
            assert!(crate::registry::check_name(p.name).is_ok(), "{}", p.name);
            assert_eq!(p.sha256.len(), 64);
        }
    }
}

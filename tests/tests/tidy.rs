//! What clippy cannot check: the architecture's one-way rules (DESIGN.md, STYLE.md §9).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The `[dependencies]` table of a manifest, as dependency names.
fn dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut in_deps = false;
    let mut names = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
        } else if in_deps && let Some((name, _)) = line.split_once('=') {
            names.push(name.trim().trim_end_matches(".workspace").to_owned());
        }
    }
    names
}

#[test]
fn proto_does_no_io_and_no_async() {
    let deps = dependencies(&root().join("proto/Cargo.toml"));
    for banned in ["tokio", "quinn", "rustls", "futures", "mio", "async-std"] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "proto depends on {banned}"
        );
    }
    for file in rust_files(&root().join("proto/src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for banned in [
            "Instant::now",
            "SystemTime::now",
            "std::fs",
            "std::net",
            "thread::sleep",
            "rand::",
        ] {
            assert!(!text.contains(banned), "{} uses {banned}", file.display());
        }
    }
}

#[test]
fn only_the_codec_module_names_bincode() {
    for file in rust_files(&root().join("proto/src")) {
        if file.ends_with("codec.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("bincode::"),
            "{} calls bincode directly",
            file.display()
        );
    }
}

#[test]
fn pure_machines_and_policies_never_read_a_clock() {
    let pure = [
        "crates/synesis-tunnel/src/machine",
        "crates/synesis-vitals/src/policy.rs",
    ];
    for dir in pure {
        let path = root().join(dir);
        let files = if path.is_dir() {
            rust_files(&path)
        } else {
            vec![path]
        };
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Tests may take one `Instant::now()` as the origin of their virtual clock.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let code = if file.ends_with("tests.rs") { "" } else { code };
            for banned in [
                "Instant::now",
                "SystemTime::now",
                "thread::sleep",
                "tokio::",
                "rand::",
            ] {
                assert!(!code.contains(banned), "{} uses {banned}", file.display());
            }
        }
    }
}

#[test]
fn the_device_reads_the_wall_clock_and_makes_request_ids_in_one_place() {
    let home = root().join("crates/synesis-tunnel/src/clock.rs");
    for dir in ["crates/synesis-tunnel/src", "crates/synesis-cli/src"] {
        for file in rust_files(&root().join(dir)) {
            if file == home {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            // Tests make ids of their own choosing.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let code = if file.ends_with("tests.rs") { "" } else { code };
            for banned in [
                "SystemTime::now",
                "UNIX_EPOCH",
                "Uuid::now_v7",
                "RequestId::from_parts",
            ] {
                assert!(
                    !code.contains(banned),
                    "{} uses {banned}; use synesis_tunnel::clock",
                    file.display()
                );
            }
        }
    }
}

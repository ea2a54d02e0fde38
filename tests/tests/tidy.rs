//! What clippy cannot check: the architecture's one-way rules (ARCHITECTURE.md §1).
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
        "crates/synesis-route/src",
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
fn the_local_ledger_depends_on_no_driver_and_reads_no_clock() {
    let crate_dir = root().join("crates/synesis-ledger-local");
    let deps = dependencies(&crate_dir.join("Cargo.toml"));
    for banned in [
        "synesis-cli",
        "synesis-cloud",
        "synesis-tunnel",
        "synesis-wire",
        "tokio",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "synesis-ledger-local depends on {banned}"
        );
    }
    // The store takes `now` from its caller; the reconcile is pure.
    for file in rust_files(&crate_dir.join("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for banned in ["Instant::now", "SystemTime::now", "unix_now", "rand::"] {
            assert!(!text.contains(banned), "{} uses {banned}", file.display());
        }
    }
}

#[test]
fn the_cloud_storage_layer_never_imports_the_ledger_and_the_cli_holds_no_storage() {
    // `ledger` builds on `storage`; the reverse would be a cycle (ARCHITECTURE.md §3).
    for file in rust_files(&root().join("cloud/src/storage")) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("crate::ledger"),
            "{} imports the ledger",
            file.display()
        );
    }
    // The cloud's pure pieces take the time from their caller.
    for file in ["cloud/src/storage/sqlite.rs", "cloud/src/registry.rs"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for banned in ["Instant::now", "SystemTime::now", "rand::"] {
            assert!(!text.contains(banned), "{file} uses {banned}");
        }
    }
    // The device's binary holds commands and rendering; databases live in library crates.
    let cli = dependencies(&root().join("crates/synesis-cli/Cargo.toml"));
    assert!(
        !cli.iter().any(|d| d == "rusqlite"),
        "synesis-cli depends on rusqlite"
    );
    // The device uses the cloud in one place: `synesis demo` runs one in process.
    for file in rust_files(&root().join("crates/synesis-cli/src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("synesis_cloud") || file.ends_with("commands/demo.rs"),
            "{} uses the cloud; only `synesis demo` may",
            file.display()
        );
    }
    let cloud = dependencies(&root().join("cloud/Cargo.toml"));
    for banned in ["synesis-cli", "synesis-tunnel"] {
        assert!(
            !cloud.iter().any(|d| d == banned),
            "the cloud depends on {banned}"
        );
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

/// PROTOCOL.md §2: an escalation is never sent in 0-RTT data. The device's TLS turns early data
/// off, and no device code asks quinn for a 0-RTT connection.
#[test]
fn the_device_never_sends_0rtt_data() {
    let crates = root().join("crates");
    for file in rust_files(&crates) {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("into_0rtt"),
            "{} asks for a 0-RTT connection",
            file.display()
        );
        assert!(
            !text.contains("enable_early_data = true"),
            "{} turns early data on",
            file.display()
        );
    }
    let tls = std::fs::read_to_string(crates.join("synesis-tunnel/src/tls.rs")).unwrap();
    assert!(tls.contains("tls.enable_early_data = false;"));
}

/// The synesis crates a manifest names under `[dependencies]` (optional ones included).
fn synesis_dependencies(manifest: &Path) -> Vec<String> {
    let mut deps: Vec<String> = dependencies(manifest)
        .into_iter()
        .filter(|d| d.starts_with("synesis-"))
        .collect();
    deps.sort();
    deps
}

#[test]
fn the_crates_import_each_other_as_the_architecture_draws_it() {
    // ARCHITECTURE.md §1, "Imports flow one way", as a table: each crate and every synesis
    // crate it may name. A new edge is a change to the drawing first.
    let graph: &[(&str, &[&str])] = &[
        ("proto", &[]),
        ("crates/synesis-wire", &["synesis-proto"]),
        ("crates/synesis-vitals", &["synesis-proto"]),
        ("crates/synesis-billing", &["synesis-proto"]),
        ("crates/synesis-infer", &[]),
        ("crates/synesis-route", &["synesis-vitals"]),
        ("crates/synesis-tunnel", &["synesis-proto", "synesis-wire"]),
        (
            "crates/synesis-ledger-local",
            &["synesis-billing", "synesis-proto"],
        ),
        (
            "cloud",
            &[
                "synesis-billing",
                "synesis-infer",
                "synesis-proto",
                "synesis-wire",
            ],
        ),
        (
            "crates/synesis-cli",
            &[
                "synesis-billing",
                "synesis-cloud",
                "synesis-infer",
                "synesis-ledger-local",
                "synesis-proto",
                "synesis-route",
                "synesis-tunnel",
                "synesis-vitals",
                "synesis-wire",
            ],
        ),
    ];
    for (dir, allowed) in graph {
        for dep in synesis_dependencies(&root().join(dir).join("Cargo.toml")) {
            assert!(
                allowed.contains(&dep.as_str()),
                "{dir} depends on {dep}, which ARCHITECTURE.md §1 does not draw"
            );
        }
    }
    // Every library crate of the workspace is in the table (tests and benches may use anything).
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    for (dir, _) in graph {
        assert!(
            manifest.contains(&format!("\"{dir}\"")),
            "{dir} is no member"
        );
    }
    let members = manifest
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix('"')?
                .strip_suffix("\",")
                .map(str::to_owned)
        })
        .filter(|m| m != "tests" && m != "benches");
    for member in members {
        assert!(
            graph.iter().any(|(dir, _)| *dir == member),
            "{member} is missing from the crate graph this test checks"
        );
    }
}

#[test]
fn the_cloud_reaches_its_database_only_through_the_storage_layer() {
    // No driver, no connection and no SQL outside `cloud/src/storage/`: handlers and `admin` go
    // through the repository traits, so a second backend is a change in one place.
    let storage = root().join("cloud/src/storage");
    let banned = [
        "rusqlite",
        ".connection()",
        ".connection_mut()",
        "SELECT ",
        "INSERT INTO",
        "DELETE FROM",
        "CREATE TABLE",
        "BEGIN IMMEDIATE",
    ];
    for file in rust_files(&root().join("cloud/src")) {
        if file.starts_with(&storage) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for word in banned {
            assert!(
                !text.contains(word),
                "{} names `{word}`: the database is the storage layer's (cloud/src/storage/)",
                file.display()
            );
        }
    }
}

//! The device's files are its owner's alone: the config and data directories are 0700 and
//! every file in them 0600 (the ledger lists every request, model and cost; the service log
//! every request id; the API key spends the account).
//!
//! Directories are made private when they are made ([`private_dir`]), files when they are
//! written ([`private_file_options`]); [`tighten`] takes back what an older version left open
//! to others (directories 0755, files 0644 under the usual umask), on every start. It only ever
//! removes permissions, never adds them, and follows no symbolic link.

use std::path::{Path, PathBuf};

/// How deep [`tighten`] looks below each directory (the deepest today:
/// `data/accounts/<id>/identity/<file>`).
const TIGHTEN_DEPTH_MAX: usize = 6;
/// The most entries [`tighten`] looks at below one directory: a directory the user pointed at
/// something large (their home, say) is not walked whole on every start.
const TIGHTEN_ENTRIES_MAX: usize = 4_096;

/// Permission bits of the group and of others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// What could not be made private.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecureFsError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make {path} private (chmod): {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates `path` (and its missing parents) readable by its owner only (0700), and takes the
/// group's and others' permissions from it if it exists.
pub(crate) fn private_dir(path: &Path) -> Result<(), SecureFsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| SecureFsError::Create {
            path: path.to_owned(),
            source,
        })?;
    let mode = std::fs::metadata(path)
        .map_err(|source| SecureFsError::Create {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & GROUP_OTHER_BITS != 0 {
        let narrowed = mode & 0o7777 & !GROUP_OTHER_BITS;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(narrowed)).map_err(
            |source| SecureFsError::Chmod {
                path: path.to_owned(),
                source,
            },
        )?;
    }
    Ok(())
}

/// Options that create a file readable and writable by its owner only (mode 0600; an existing
/// file keeps its mode, which [`tighten`] narrows).
pub(crate) fn private_file_options() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.mode(0o600);
    options
}

/// What [`tighten`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tightened {
    /// Files and directories whose group or other permissions were removed.
    pub(crate) narrowed: Vec<PathBuf>,
    /// Those it could not change (owned by someone else, say), with why.
    pub(crate) failed: Vec<(PathBuf, String)>,
}

/// Removes the group's and others' permissions from `roots` and everything below them (files
/// keep their owner's bits: 0644 becomes 0600, 0755 becomes 0700). A root that does not exist
/// is skipped; symbolic links are neither followed nor changed.
pub(crate) fn tighten(roots: &[&Path]) -> Tightened {
    tighten_except(roots, &[])
}

/// [`tighten`], without looking inside the directories `opaque` (narrowing them, though).
fn tighten_except(roots: &[&Path], opaque: &[&Path]) -> Tightened {
    let mut done = Tightened::default();
    for root in roots {
        let mut seen = 0;
        tighten_below(root, 0, opaque, &mut seen, &mut done);
    }
    done
}

fn tighten_below(
    path: &Path,
    depth: usize,
    opaque: &[&Path],
    seen: &mut usize,
    done: &mut Tightened,
) {
    use std::os::unix::fs::PermissionsExt;
    *seen += 1;
    if *seen > TIGHTEN_ENTRIES_MAX {
        return;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return;
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        let narrowed = mode & !GROUP_OTHER_BITS;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(narrowed)) {
            Ok(()) => done.narrowed.push(path.to_owned()),
            Err(e) => done.failed.push((path.to_owned(), e.to_string())),
        }
    }
    if kind.is_dir() && depth < TIGHTEN_DEPTH_MAX && !opaque.contains(&path) {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            tighten_below(&entry.path(), depth + 1, opaque, seen, done);
        }
    }
}

/// Makes the config and data directories private (created 0700 when missing), and narrows
/// whatever an older version left readable below them and the runtime directory. Says so on
/// stderr when it changed anything, which happens once: afterwards nothing is left to narrow.
pub(crate) fn secure_home(paths: &crate::paths::Paths) -> Result<(), SecureFsError> {
    // The runtime directory the service makes 0700 on every start; what it holds (a lock
    // with a pid, the socket, 0600) is not looked at.
    let runtime = paths.runtime.path.as_path();
    let mut roots = vec![paths.config.path.as_path(), paths.data.path.as_path()];
    if !runtime.starts_with(&paths.data.path) && !runtime.starts_with(&paths.config.path) {
        roots.push(runtime);
    }
    let done = tighten_except(&roots, &[runtime]);
    // After the narrowing, which counts what it changed: here only what is missing is made.
    private_dir(&paths.config.path)?;
    private_dir(&paths.data.path)?;
    if !done.narrowed.is_empty() {
        eprintln!(
            "synesis: {} of your Synesis files and directories could be read by other users of this machine; they are private now (files 0600, directories 0700), e.g. {}",
            done.narrowed.len(),
            done.narrowed[0].display()
        );
    }
    for (path, why) in &done.failed {
        eprintln!(
            "synesis: warning: other users may read {}, which could not be made private: {why}",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn what_others_could_read_is_narrowed_once_and_links_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let identity = data.join("accounts/a1/identity");
        std::fs::create_dir_all(&identity).unwrap();
        for d in [
            &data,
            &data.join("accounts"),
            &data.join("accounts/a1"),
            &identity,
        ] {
            chmod(d, 0o755);
        }
        let ledger = data.join("ledger.db");
        std::fs::write(&ledger, b"x").unwrap();
        chmod(&ledger, 0o644);
        let script = data.join("hook.sh");
        std::fs::write(&script, b"x").unwrap();
        chmod(&script, 0o755);
        let key = identity.join("device.key.der");
        std::fs::write(&key, b"k").unwrap();
        chmod(&key, 0o600);
        // A link to a file of someone else's: not followed, not changed.
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"o").unwrap();
        chmod(&outside, 0o644);
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();

        let done = tighten(&[&data, &dir.path().join("missing")]);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&identity), 0o700);
        assert_eq!(mode(&ledger), 0o600);
        assert_eq!(mode(&script), 0o700, "the owner keeps their own bits");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            mode(&outside),
            0o644,
            "a link's target is not ours to change"
        );
        assert_eq!(done.narrowed.len(), 6, "{:?}", done.narrowed);
        assert_eq!(tighten(&[&data]), Tightened::default(), "nothing twice");
    }

    #[test]
    fn private_dirs_are_made_0700_and_an_open_one_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("a/b");
        private_dir(&made).unwrap();
        assert_eq!(mode(&made), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
        chmod(&made, 0o755);
        private_dir(&made).unwrap();
        assert_eq!(mode(&made), 0o700);
        let file = made.join("f");
        private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}

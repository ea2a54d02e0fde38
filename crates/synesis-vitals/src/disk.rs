//! Which mounted file system holds a path.

use std::path::{Path, PathBuf};

/// The nearest ancestor of `path` (itself included) that exists, made absolute and with links
/// resolved, so that a data directory that is not created yet still finds its disk.
pub(crate) fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors().find_map(|p| p.canonicalize().ok())
}

/// The index of the mount point that holds `path`: the longest one that is a prefix of it,
/// compared component by component (`/data` does not hold `/database`).
pub(crate) fn mount_holding<'a>(
    path: &Path,
    mounts: impl IntoIterator<Item = &'a Path>,
) -> Option<usize> {
    mounts
        .into_iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(m))
        .max_by_key(|(_, m)| m.components().count())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_matching_mount_wins() {
        let mounts = [
            Path::new("/"),
            Path::new("/data"),
            Path::new("/data/fast"),
            Path::new("/d"),
        ];
        let pick = |p: &str| mount_holding(Path::new(p), mounts.iter().copied());
        assert_eq!(pick("/data/fast/synesis"), Some(2));
        assert_eq!(pick("/data/slow"), Some(1));
        assert_eq!(pick("/database"), Some(0));
        assert_eq!(pick("/home/ada"), Some(0));
        assert_eq!(mount_holding(Path::new("/x"), [Path::new("/y")]), None);
    }

    #[test]
    fn a_missing_directory_uses_its_nearest_existing_ancestor() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let missing = tmp.join("synesis-vitals-does-not-exist/a/b");
        assert_eq!(existing_ancestor(&missing), Some(tmp));
    }
}

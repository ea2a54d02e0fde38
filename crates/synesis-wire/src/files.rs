//! Key and certificate files, as both ends store them: written atomically (temp file, fsync,
//! rename, fsync of the directory), secrets with mode 0600 so only their owner reads them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

/// Readable by the owner only: keys.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o600)
}

pub fn write_public_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, bytes, 0o644)
}

/// Temp names tried before giving up: a name is taken only by a leftover of a crashed writer
/// with the same process id (ids are reused; a restarted container often gets the same one),
/// and a crash leaves at most the few temp files it was writing.
const TEMP_NAME_ATTEMPTS_MAX: u64 = 64;

/// Numbers this process's temp files, so that two writes never pick the same name.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `.<name>.<pid>.<n>.tmp` beside `path`.
fn temp_path(path: &Path, pid: u32, n: u64) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{pid}.{n}.tmp"))
}

/// Temp file, fsync, rename, fsync of the directory: after a crash at any point `path` holds
/// the old bytes or the new, and a leftover temp file never stands in the way of the next write
/// (it is skipped, not removed: it might be a live writer's in another process).
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut options = std::fs::OpenOptions::new();
    // Never an existing file: a name taken by someone else is skipped, and a symlink planted
    // at the temp name is not followed.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let pid = std::process::id();
    let mut attempt = 0;
    let (tmp, mut file) = loop {
        let tmp = temp_path(path, pid, TEMP_COUNTER.fetch_add(1, Ordering::Relaxed));
        match options.open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    && attempt + 1 < TEMP_NAME_ATTEMPTS_MAX =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // The rename is durable only once the directory's entry is on disk.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    #[test]
    fn a_temp_file_left_by_a_crashed_writer_does_not_block_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key.der");
        // What a writer with this process id (ids are reused: a restarted container often gets
        // the same one) leaves behind when killed between creating its temp file and renaming.
        let pid = std::process::id();
        let next = TEMP_COUNTER.load(Ordering::Relaxed);
        let mut stale: Vec<PathBuf> = (next..next + 3).map(|n| temp_path(&path, pid, n)).collect();
        // The name this module used before, when it took one per process id.
        stale.push(path.with_extension(format!("tmp.{pid}")));
        for leftover in &stale {
            std::fs::write(leftover, b"half a key").unwrap();
        }
        write_secret_file(&path, b"key").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"key");
        write_secret_file(&path, b"new key").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new key");
        // Leftovers are skipped, never removed: one might be a live writer's.
        assert!(stale.iter().all(|p| p.exists()));
    }

    #[test]
    fn a_failed_rename_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp file was written.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        assert!(write_public_file(&blocked, b"new").is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["blocked"]);
    }
}

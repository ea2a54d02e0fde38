//! One module per command. Each prints text for people, or JSON with `--json`.

pub(crate) mod ask;
pub(crate) mod cloud;
#[cfg(feature = "demo")]
pub(crate) mod demo;
pub(crate) mod escalate;
pub(crate) mod model;
pub(crate) mod paths;
pub(crate) mod push;
pub(crate) mod service;
pub(crate) mod tunnel;
pub(crate) mod usage;
pub(crate) mod vitals;

use std::io::Write;

use serde::Serialize;
use synesis_ledger_local::LedgerError;

/// Where a command's report goes, and in which form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    json: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Output {
        Output { json }
    }

    pub(crate) fn json(&self) -> bool {
        self.json
    }

    /// Prints `value` as one line of JSON, or `human()` for people. A closed pipe (`| head`)
    /// comes back as `ErrorKind::BrokenPipe`, which callers treat as "stop", not as failure.
    pub(crate) fn report<T: Serialize>(
        &self,
        value: &T,
        human: impl FnOnce() -> String,
    ) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer(&mut stdout, value)?;
            stdout.write_all(b"\n")?;
        } else {
            stdout.write_all(human().as_bytes())?;
        }
        stdout.flush()
    }
}

/// The local ledger's errors as the user reads them: the library says what happened; what to do
/// about it is said here.
pub(crate) fn ledger_error(err: LedgerError) -> anyhow::Error {
    match err {
        LedgerError::NotALedger { .. } => {
            anyhow::anyhow!("{err}; move it aside and the next answer starts a new one")
        }
        LedgerError::NewerSchema {
            path,
            found,
            supported,
        } => anyhow::anyhow!(
            "the local ledger {} has schema version {found}, newer than this synesis reads \
             ({supported}); upgrade synesis",
            path.display()
        ),
        other => other.into(),
    }
}

/// Whether an output error means only that the reader went away.
pub(crate) fn is_closed_pipe(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::BrokenPipe
}

/// A progress bar in bytes on stderr (message, bar, bytes of total, rate, time left): the one
/// look of every long transfer (`cloud push`, `model pull`).
pub(crate) fn bytes_bar(total: Option<u64>) -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{msg:12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn ledger_errors_say_what_to_do_about_them() {
        let path = PathBuf::from("/data/ledger.db");
        let not_ours = ledger_error(LedgerError::NotALedger { path: path.clone() });
        assert_eq!(
            not_ours.to_string(),
            "/data/ledger.db is not a Synesis local ledger (not an SQLite database, damaged, or \
             another program's database); move it aside and the next answer starts a new one"
        );
        let newer = ledger_error(LedgerError::NewerSchema {
            path,
            found: 2,
            supported: 1,
        });
        assert_eq!(
            newer.to_string(),
            "the local ledger /data/ledger.db has schema version 2, newer than this synesis reads \
             (1); upgrade synesis"
        );
        let other = ledger_error(LedgerError::Overflow);
        assert!(other.downcast_ref::<LedgerError>().is_some());
    }
}

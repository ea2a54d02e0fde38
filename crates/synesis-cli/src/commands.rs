//! One module per command. Each prints text for people, or JSON with `--json`.

pub(crate) mod ask;
pub(crate) mod cloud;
pub(crate) mod model;
pub(crate) mod paths;
pub(crate) mod tunnel;
pub(crate) mod usage;
pub(crate) mod vitals;

use std::io::Write;

use serde::Serialize;

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

/// Whether an output error means only that the reader went away.
pub(crate) fn is_closed_pipe(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::BrokenPipe
}

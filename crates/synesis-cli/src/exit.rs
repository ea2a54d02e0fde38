//! Exit codes, decided in one place.

/// The command failed.
pub(crate) const FAILURE: u8 = 1;
/// The command line was wrong (clap exits with 2 itself; errors found later use it too).
pub(crate) const USAGE: u8 = 2;
/// The tunnel service is not running (for commands that need it).
pub(crate) const NOT_RUNNING: u8 = 3;
/// Stopped by Ctrl-C (or SIGTERM) before it was done: 128 + SIGINT, as shells report it.
pub(crate) const INTERRUPTED: u8 = 130;

/// A failure the user can act on, with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "the tunnel service is not running; `synesis tunnel start` starts it in the background (`synesis tunnel run` in the foreground)"
    )]
    NotRunning,
    /// Stopped before the end; the text says what was left and how to go on.
    #[error("{0}")]
    Interrupted(String),
}

pub(crate) fn code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<UserError>() {
        Some(UserError::Usage(_)) => USAGE,
        Some(UserError::NotRunning) => NOT_RUNNING,
        Some(UserError::Interrupted(_)) => INTERRUPTED,
        None => FAILURE,
    }
}

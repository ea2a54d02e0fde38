//! Exit codes, decided in one place.

/// The command failed.
pub(crate) const FAILURE: u8 = 1;
/// The command line was wrong (clap exits with 2 itself; errors found later use it too).
pub(crate) const USAGE: u8 = 2;

/// A failure the user can act on, with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    #[error("{0}")]
    Usage(String),
}

pub(crate) fn code_for(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<UserError>() {
        Some(UserError::Usage(_)) => USAGE,
        None => FAILURE,
    }
}

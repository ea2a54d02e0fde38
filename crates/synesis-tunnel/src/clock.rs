//! The device's one way to read the wall clock and its one way to make a request id (STYLE.md
//! §1: the clock and randomness only at the edges). Everything else on the device is given
//! times and ids from here, or as arguments; `tests/tests/tidy.rs` holds the tunnel and the CLI
//! to it. (Monotonic `Instant`s, for timeouts and RTTs, are the drivers' business.)

use std::time::{SystemTime, UNIX_EPOCH};

use synesis_proto::{RequestId, UnixMillis};

/// The wall clock now. A clock set before 1970 reads as the epoch.
pub fn unix_now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// `at` as the standard library's time, for formatting (a time before 1970 reads as the epoch).
pub fn system_time(at: UnixMillis) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(at.0).unwrap_or(0))
}

/// A fresh request id: a UUID v7 of [`unix_now`] and 10 bytes from the OS's randomness.
pub fn new_request_id() -> RequestId {
    let ms = u64::try_from(unix_now().0).unwrap_or(0);
    let mut random = [0u8; 10];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    RequestId::from_parts(ms, random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_carry_the_time_they_were_made_and_never_repeat() {
        let before = unix_now();
        let (a, b) = (new_request_id(), new_request_id());
        let after = unix_now();
        assert_ne!(a, b);
        for id in [a, b] {
            let ms = i64::try_from(id.unix_ms()).unwrap_or(i64::MAX);
            assert!(
                before.0 <= ms && ms <= after.0,
                "{id} outside {before:?}..{after:?}"
            );
        }
    }
}

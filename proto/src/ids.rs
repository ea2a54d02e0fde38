//! Identifiers, time and money: newtypes, so that a device id is never passed where a request id
//! belongs, and micro-dollars are never mistaken for tokens.
//!
//! On the wire (bincode, not human-readable) an id is exactly 16 raw bytes, big-endian UUID
//! order, with no length prefix. In human-readable formats (JSON) it is the hyphenated string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a UUID is not a valid id of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a UUID: {0}")]
    Syntax(String),
    #[error("the nil UUID is not an id")]
    Nil,
    #[error("a request id must be a UUID v7 (or v8, derived from content), got version {0}")]
    NotV7(usize),
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $check:expr) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// Checks that `uuid` is a valid id of this kind.
            pub fn try_from_uuid(uuid: Uuid) -> Result<Self, IdError> {
                if uuid.is_nil() {
                    return Err(IdError::Nil);
                }
                let check: fn(&Uuid) -> Result<(), IdError> = $check;
                check(&uuid)?;
                Ok(Self(uuid))
            }

            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl TryFrom<Uuid> for $name {
            type Error = IdError;
            fn try_from(uuid: Uuid) -> Result<Self, IdError> {
                Self::try_from_uuid(uuid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let uuid = Uuid::parse_str(s).map_err(|e| IdError::Syntax(e.to_string()))?;
                Self::try_from_uuid(uuid)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(&self.0.hyphenated())
                } else {
                    // A fixed-size array serialises as a tuple: 16 raw bytes, no length prefix.
                    self.0.as_bytes().serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    s.parse().map_err(D::Error::custom)
                } else {
                    let bytes = <[u8; 16]>::deserialize(d)?;
                    Self::try_from_uuid(Uuid::from_bytes(bytes)).map_err(D::Error::custom)
                }
            }
        }
    };
}

uuid_id!(
    /// A client-chosen request id, UUID v7 (time-ordered), or v8 when derived from what the
    /// request carries ([`RequestId::from_digest`], upload ids). It is the idempotency key of
    /// the request end to end: a retry with the same id is answered from what was already done.
    RequestId,
    |uuid| match uuid.get_version_num() {
        7 | 8 => Ok(()),
        other => Err(IdError::NotV7(other)),
    }
);

uuid_id!(
    /// A device, assigned by the cloud at enrollment.
    DeviceId,
    |_| Ok(())
);

uuid_id!(
    /// An account, assigned by the cloud when it is created.
    AccountId,
    |_| Ok(())
);

impl RequestId {
    /// Builds a v7 id from the Unix time in milliseconds and 10 random bytes. The caller reads
    /// the clock and the random source; this crate does neither.
    pub fn from_parts(unix_ms: u64, random: [u8; 10]) -> Self {
        Self(uuid::Builder::from_unix_timestamp_millis(unix_ms, &random).into_uuid())
    }

    /// An id derived from content rather than drawn (UUID v8 from the first 16 bytes of a
    /// digest): the same input gives the same id, so a retry names the same upload.
    pub fn from_digest(digest: [u8; 16]) -> Self {
        Self(uuid::Builder::from_custom_bytes(digest).into_uuid())
    }

    /// The creation time the id carries (milliseconds since the Unix epoch).
    pub fn unix_ms(&self) -> u64 {
        let b = self.0.as_bytes();
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

/// Milliseconds since the Unix epoch, UTC. Wire: a zigzag varint `i64`. Human-readable formats
/// (JSON) show it as RFC 3339 with milliseconds, `2026-11-22T08:30:00.000Z`, and read either that
/// or the integer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// RFC 3339 in UTC with milliseconds, or `None` outside the years chrono can represent.
    pub fn to_rfc3339(self) -> Option<String> {
        chrono::DateTime::from_timestamp_millis(self.0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }

    pub fn parse_rfc3339(s: &str) -> Result<UnixMillis, chrono::ParseError> {
        chrono::DateTime::parse_from_rfc3339(s).map(|t| UnixMillis(t.timestamp_millis()))
    }
}

impl Serialize for UnixMillis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.to_rfc3339() {
            Some(text) if s.is_human_readable() => s.serialize_str(&text),
            _ => s.serialize_i64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for UnixMillis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = UnixMillis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 time or milliseconds since the Unix epoch")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UnixMillis, E> {
                Ok(UnixMillis(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UnixMillis, E> {
                i64::try_from(v).map(UnixMillis).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UnixMillis, E> {
                UnixMillis::parse_rfc3339(v).map_err(E::custom)
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(Visitor)
        } else {
            d.deserialize_i64(Visitor)
        }
    }
}

/// Money, in micro-US-dollars (1 USD = 1,000,000). Integers only: no floating point touches a
/// balance or a charge anywhere in Synesis.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    pub fn checked_add(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_add(other.0).map(MicroUsd)
    }

    pub fn checked_sub(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_sub(other.0).map(MicroUsd)
    }
}

impl fmt::Display for MicroUsd {
    /// Dollars with six decimals, exact: `-1.250000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

/// A SHA-256 digest. Wire: 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

/// Opaque bytes (certificates, upload chunks). Wire: a varint length, then the bytes.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Blob(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob(v)
    }
}

/// A secret (a provider key) in transit. Its `Debug` never shows it, so a message that
/// carries one can be logged without leaking it. Wire: a string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[cfg(test)]
pub(crate) mod arbitrary {
    //! Strategies for property tests: ids are valid by construction.
    use super::*;
    use proptest::prelude::*;

    impl proptest::arbitrary::Arbitrary for RequestId {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            (0u64..(1 << 48), any::<[u8; 10]>())
                .prop_map(|(ms, r)| RequestId::from_parts(ms, r))
                .boxed()
        }
    }

    macro_rules! arbitrary_any_uuid {
        ($name:ident) => {
            impl proptest::arbitrary::Arbitrary for $name {
                type Parameters = ();
                type Strategy = BoxedStrategy<Self>;
                fn arbitrary_with(_: ()) -> Self::Strategy {
                    any::<u128>()
                        .prop_filter_map("nil", |n| $name::try_from_uuid(Uuid::from_u128(n)).ok())
                        .boxed()
                }
            }
        };
    }
    arbitrary_any_uuid!(DeviceId);
    arbitrary_any_uuid!(AccountId);

    impl proptest::arbitrary::Arbitrary for UnixMillis {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            any::<i64>().prop_map(UnixMillis).boxed()
        }
    }

    impl proptest::arbitrary::Arbitrary for MicroUsd {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            any::<i64>().prop_map(MicroUsd).boxed()
        }
    }

    impl proptest::arbitrary::Arbitrary for Sha256 {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            any::<[u8; 32]>().prop_map(Sha256).boxed()
        }
    }

    impl proptest::arbitrary::Arbitrary for Blob {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            proptest::collection::vec(any::<u8>(), 0..512)
                .prop_map(Blob)
                .boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_rejects_other_versions() {
        let v4 = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
        assert_eq!(RequestId::try_from_uuid(v4), Err(IdError::NotV7(4)));
        assert_eq!(RequestId::try_from_uuid(Uuid::nil()), Err(IdError::Nil));
        let derived = RequestId::from_digest([7; 16]);
        assert_eq!(RequestId::try_from_uuid(*derived.as_uuid()), Ok(derived));
    }

    #[test]
    fn request_id_carries_its_time() {
        let id = RequestId::from_parts(1_795_000_000_123, [7; 10]);
        assert_eq!(id.unix_ms(), 1_795_000_000_123);
        assert_eq!(id.as_uuid().get_version_num(), 7);
        assert_eq!(id.to_string().parse::<RequestId>(), Ok(id));
    }

    #[test]
    fn money_displays_exactly() {
        assert_eq!(MicroUsd(1_250_000).to_string(), "1.250000");
        assert_eq!(MicroUsd(-5).to_string(), "-0.000005");
        assert_eq!(MicroUsd(i64::MIN).to_string(), "-9223372036854.775808");
    }

    #[test]
    fn times_are_rfc3339_in_json_and_integers_on_the_wire() {
        let t = UnixMillis(1_795_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-18T11:06:40.123Z\"");
        assert_eq!(serde_json::from_str::<UnixMillis>(&json).unwrap(), t);
        assert_eq!(
            serde_json::from_str::<UnixMillis>("1795000000123").unwrap(),
            t
        );
        assert_eq!(
            UnixMillis::parse_rfc3339("2026-11-18T12:06:40.123+01:00").unwrap(),
            t
        );
    }

    #[test]
    fn ids_are_strings_in_json() {
        let id = RequestId::from_parts(1, [0; 10]);
        let json = serde_json::to_string(&id).unwrap_or_default();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<RequestId>(&json).ok(), Some(id));
    }
}

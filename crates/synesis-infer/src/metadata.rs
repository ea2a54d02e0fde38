//! Reads a GGUF file's header and metadata in Rust, with a limit on every length, before
//! llama.cpp sees the file: so a registry can check "is this a GGUF model, which architecture,
//! which context length, is it an adapter" on any file, corrupt ones included, without a crash.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Metadata entries read at most.
const KV_COUNT_MAX: u64 = 100_000;
/// The longest string read.
const STRING_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The most array elements skipped over.
const ARRAY_LEN_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0}: cannot read: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a GGUF file (it does not start with \"GGUF\")")]
    NotGguf(PathBuf),
    #[error("{0}: GGUF version {1} is not supported (2 and 3 are)")]
    Version(PathBuf, u32),
    #[error("{0}: the GGUF header is damaged or truncated: {1}")]
    Damaged(PathBuf, String),
}

/// A scalar metadata value (arrays are skipped; their length is kept).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { len: u64 },
}

#[derive(Debug, Clone)]
pub struct GgufMetadata {
    pub version: u32,
    pub tensor_count: u64,
    pub values: BTreeMap<String, MetaValue>,
}

impl GgufMetadata {
    pub fn read(path: &Path) -> Result<GgufMetadata, MetadataError> {
        let file = File::open(path).map_err(|e| MetadataError::Io(path.to_owned(), e))?;
        let mut r = Reader {
            inner: BufReader::new(file),
            path,
        };
        let mut magic = [0u8; 4];
        r.bytes(&mut magic)
            .map_err(|_| MetadataError::NotGguf(path.to_owned()))?;
        if &magic != b"GGUF" {
            return Err(MetadataError::NotGguf(path.to_owned()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(MetadataError::Version(path.to_owned(), version));
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        if kv_count > KV_COUNT_MAX {
            return Err(r.damaged(format!("{kv_count} metadata entries")));
        }
        let mut values = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind)?;
            values.insert(key, value);
        }
        Ok(GgufMetadata {
            version,
            tensor_count,
            values,
        })
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(MetaValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.values.get(key) {
            Some(MetaValue::Int(i)) => u64::try_from(*i).ok(),
            _ => None,
        }
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.str("general.architecture")
    }

    /// Whether `general.type` says adapter (a LoRA file rather than a model).
    pub fn is_adapter(&self) -> bool {
        self.str("general.type") == Some("adapter")
    }

    /// The context length the model was trained for.
    pub fn context_length(&self) -> Option<u64> {
        self.uint(&format!("{}.context_length", self.architecture()?))
    }
}

struct Reader<'p> {
    inner: BufReader<File>,
    path: &'p Path,
}

impl Reader<'_> {
    fn damaged(&self, why: String) -> MetadataError {
        MetadataError::Damaged(self.path.to_owned(), why)
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), MetadataError> {
        self.inner
            .read_exact(buf)
            .map_err(|e| self.damaged(e.to_string()))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MetadataError> {
        let mut b = [0u8; N];
        self.bytes(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, MetadataError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, MetadataError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, MetadataError> {
        let len = self.u64()?;
        if len > STRING_BYTES_MAX {
            return Err(self.damaged(format!("a string of {len} bytes")));
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| self.damaged("length".into()))?];
        self.bytes(&mut buf)?;
        String::from_utf8(buf).map_err(|_| self.damaged("a string that is not UTF-8".into()))
    }

    fn skip(&mut self, n: u64) -> Result<(), MetadataError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| self.damaged(e.to_string()))?;
        if copied != n {
            return Err(self.damaged("truncated".into()));
        }
        Ok(())
    }

    fn value(&mut self, kind: u32) -> Result<MetaValue, MetadataError> {
        Ok(match kind {
            0 => MetaValue::Int(i128::from(u8::from_le_bytes(self.array()?))),
            1 => MetaValue::Int(i128::from(i8::from_le_bytes(self.array()?))),
            2 => MetaValue::Int(i128::from(u16::from_le_bytes(self.array()?))),
            3 => MetaValue::Int(i128::from(i16::from_le_bytes(self.array()?))),
            4 => MetaValue::Int(i128::from(self.u32()?)),
            5 => MetaValue::Int(i128::from(i32::from_le_bytes(self.array()?))),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.array()?))),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let len = self.u64()?;
                if len > ARRAY_LEN_MAX {
                    return Err(self.damaged(format!("an array of {len} elements")));
                }
                match elem_size(elem) {
                    Some(size) => self.skip(len * size)?,
                    None if elem == 8 => {
                        for _ in 0..len {
                            let n = self.u64()?;
                            if n > STRING_BYTES_MAX {
                                return Err(self.damaged(format!("a string of {n} bytes")));
                            }
                            self.skip(n)?;
                        }
                    }
                    None => return Err(self.damaged(format!("an array of type {elem}"))),
                }
                MetaValue::Array { len }
            }
            10 => MetaValue::Int(i128::from(self.u64()?)),
            11 => MetaValue::Int(i128::from(i64::from_le_bytes(self.array()?))),
            12 => MetaValue::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(self.damaged(format!("unknown value type {other}"))),
        })
    }
}

fn elem_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

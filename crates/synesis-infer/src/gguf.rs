//! A GGUF v3 writer: enough of the format to write the tiny models and adapters that tests, the
//! benches and `synesis model add --tiny` use (f32 tensors, the scalar, string and array
//! metadata types). Layout (ggml's `gguf.h`):
//!
//! ```text
//! "GGUF" | version u32 = 3 | tensor count u64 | metadata count u64
//! metadata: key (u64 length + bytes) | type u32 | value
//! tensor infos: name | n_dims u32 | ne[0..n_dims] u64 | type u32 (0 = f32) | offset u64
//! padding to ALIGNMENT | tensor data, each tensor starting on a multiple of ALIGNMENT
//! ```
//! All integers little-endian.

use std::io::{self, Write};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
/// `general.alignment`'s default; written data follows it.
const ALIGNMENT: u64 = 32;

const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const GGML_TYPE_F32: u32 = 0;

#[derive(Debug, Clone)]
pub(crate) enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

#[derive(Debug)]
pub(crate) struct Tensor {
    pub(crate) name: String,
    /// ggml order: `ne[0]` is the fastest-varying dimension (a weight `[in, out]`).
    pub(crate) ne: Vec<u64>,
    pub(crate) data: Vec<f32>,
}

#[derive(Debug, Default)]
pub(crate) struct Gguf {
    metadata: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl Gguf {
    pub(crate) fn set(&mut self, key: &str, value: Value) {
        self.metadata.push((key.to_owned(), value));
    }

    pub(crate) fn tensor(&mut self, name: &str, ne: &[u64], data: Vec<f32>) {
        debug_assert_eq!(ne.iter().product::<u64>(), data.len() as u64, "{name}");
        self.tensors.push(Tensor {
            name: name.to_owned(),
            ne: ne.to_vec(),
            data,
        });
    }

    pub(crate) fn write(&self, w: &mut impl Write) -> io::Result<()> {
        // Everything before the tensor data is small: build it, then pad it to the alignment.
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend(VERSION.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            head.extend(string(key));
            head.extend(encode_value(value));
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            head.extend(string(&t.name));
            head.extend(u32::try_from(t.ne.len()).unwrap_or(u32::MAX).to_le_bytes());
            for d in &t.ne {
                head.extend(d.to_le_bytes());
            }
            head.extend(GGML_TYPE_F32.to_le_bytes());
            head.extend(offset.to_le_bytes());
            offset = align(offset + 4 * t.data.len() as u64);
        }
        head.resize(
            usize::try_from(align(head.len() as u64)).unwrap_or(head.len()),
            0,
        );
        w.write_all(&head)?;
        for t in &self.tensors {
            let bytes: Vec<u8> = t.data.iter().flat_map(|f| f.to_le_bytes()).collect();
            let len = bytes.len() as u64;
            w.write_all(&bytes)?;
            w.write_all(&vec![0u8; usize::try_from(align(len) - len).unwrap_or(0)])?;
        }
        Ok(())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let array_header = |out: &mut Vec<u8>, elem: u32, n: usize| {
        out.extend(TYPE_ARRAY.to_le_bytes());
        out.extend(elem.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            out.extend(TYPE_U32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Value::F32(x) => {
            out.extend(TYPE_F32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Value::Bool(x) => {
            out.extend(TYPE_BOOL.to_le_bytes());
            out.push(u8::from(*x));
        }
        Value::Str(s) => {
            out.extend(TYPE_STRING.to_le_bytes());
            out.extend(string(s));
        }
        Value::Strings(v) => {
            array_header(&mut out, TYPE_STRING, v.len());
            v.iter().for_each(|s| out.extend(string(s)));
        }
        Value::F32s(v) => {
            array_header(&mut out, TYPE_F32, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Value::I32s(v) => {
            array_header(&mut out, TYPE_I32, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
    }
    out
}

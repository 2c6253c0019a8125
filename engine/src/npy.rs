//! Reading and writing NumPy `.npy` files (format version 1.0 and 2.0, little-endian float32),
//! the exchange format with the Python reference implementations.

use std::io::Write;

use crate::error::{EngineError, Result};

/// A float32 array with its shape, in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Array {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape does not match data length");
        Array { shape, data }
    }
}

/// Encodes an array as a version 1.0 `.npy` file with dtype `<f4`.
pub fn encode(array: &Array) -> Vec<u8> {
    let shape = match array.shape.len() {
        1 => format!("({},)", array.shape[0]),
        _ => format!(
            "({})",
            array.shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header + newline, padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');

    let mut out = Vec::with_capacity(10 + header.len() + array.data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &array.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes a `.npy` file holding little-endian float32 (`<f4`) or float64 (`<f8`) values in C order.
pub fn decode(bytes: &[u8]) -> Result<Array> {
    let bad = |msg: &str| EngineError::Input(format!("not a supported .npy file: {msg}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header"));
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(bad(&format!("format version {v}"))),
    };
    let header = bytes
        .get(header_start..header_start + header_len)
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not UTF-8"))?;

    let descr = header_value(header, "descr").ok_or_else(|| bad("no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if header_value(header, "fortran_order").map(str::trim) == Some("True") {
        return Err(bad("Fortran order is not supported"));
    }
    let shape_text = header_value(header, "shape").ok_or_else(|| bad("no 'shape'"))?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("shape is not a tuple of integers")))
        .collect::<Result<_>>()?;
    let count: usize = shape.iter().product();
    let body = &bytes[header_start + header_len..];

    let data = match descr {
        "<f4" => {
            if body.len() != count * 4 {
                return Err(bad(&format!("expected {} data bytes, found {}", count * 4, body.len())));
            }
            body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        "<f8" => {
            if body.len() != count * 8 {
                return Err(bad(&format!("expected {} data bytes, found {}", count * 8, body.len())));
            }
            body.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect()
        }
        other => return Err(bad(&format!("dtype '{other}' (expected '<f4' or '<f8')"))),
    };
    Ok(Array { shape, data })
}

/// Returns the raw text of `key`'s value in a Python dict literal such as an npy header.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find(',').unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

/// Reads a `.npy` file from disk.
pub fn read(path: &std::path::Path) -> Result<Array> {
    let bytes = std::fs::read(path)
        .map_err(|e| EngineError::io(format!("cannot read {}", path.display()), e))?;
    decode(&bytes).map_err(|e| EngineError::Input(format!("{}: {e}", path.display())))
}

/// Writes a `.npy` file to disk.
pub fn write(path: &std::path::Path, array: &Array) -> Result<()> {
    let mut file = std::fs::File::create(path)
        .map_err(|e| EngineError::io(format!("cannot create {}", path.display()), e))?;
    file.write_all(&encode(array))
        .map_err(|e| EngineError::io(format!("cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let array = Array::new(vec![2, 3], vec![1.0, -2.5, 3.0, 0.0, 1e-7, f32::MAX]);
        let bytes = encode(&array);
        assert_eq!(bytes.len() % 64, (6 * 4) % 64, "header must be padded to 64 bytes");
        assert_eq!(decode(&bytes).unwrap(), array);
    }

    #[test]
    fn npy_rejects_truncated_body() {
        let bytes = encode(&Array::new(vec![4], vec![1.0; 4]));
        let error = decode(&bytes[..bytes.len() - 1]).unwrap_err().to_string();
        assert!(error.contains("expected 16 data bytes"), "{error}");
    }
}

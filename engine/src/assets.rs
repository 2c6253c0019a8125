//! The atlas on disk and over the wire: a `manifest.json` that lists every file with its dtype,
//! shape, byte size and SHA-256, and raw little-endian tensor files. The command line writes it
//! and the page reads it through this module; `docs/atlas-format.md` describes the format.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Value of the manifest's `format` field.
pub const FORMAT: &str = "clip-lens-atlas";

/// Version of the format this module reads and writes.
pub const VERSION: u32 = 1;

/// File name of the manifest inside an atlas directory.
pub const MANIFEST: &str = "manifest.json";

/// The per-block tensors, in the order the writer lists them.
pub const BLOCK_TENSORS: &[&str] = &[
    "mean_coefficients",
    "mean_shared",
    "threshold",
    "direction",
    "explained",
    "selectivity",
    "top_images",
    "top_norms",
    "terms",
    "term_weights",
    "classes",
    "class_alignment",
];

/// Element type of an atlas file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    U32,
    U16,
    /// UTF-8 text, one item per line.
    Text,
}

impl Dtype {
    /// Bytes per element (1 for text, whose shape counts lines).
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::U16 => 2,
            Dtype::Text => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::U32 => "u32",
            Dtype::U16 => "u16",
            Dtype::Text => "text",
        }
    }
}

/// The atlas manifest (`manifest.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: ModelInfo,
    pub blocks: Vec<BlockInfo>,
    /// Top images kept per neuron.
    pub k: usize,
    /// Text terms per neuron.
    pub m: usize,
    pub images: ImagesInfo,
    pub vocabulary: VocabularyInfo,
    pub classes: ClassesInfo,
    pub build: BuildInfo,
    pub files: Vec<FileEntry>,
}

/// The model an atlas was built for: the vision tower's shape and the weights' hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Name of the model directory.
    pub name: String,
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    /// MLP neurons per block, N.
    pub neurons: usize,
    /// Joint embedding width, d.
    pub embed_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// `quick_gelu` or `gelu`.
    pub activation: String,
    /// SHA-256 of the `.safetensors` file, lowercase hex.
    pub weights_sha256: String,
}

/// One source block of the atlas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub layer: usize,
    /// (Later block, head) pairs K: the rows of `mean_coefficients`.
    pub pairs: usize,
}

/// An image that could not be read, with the decoder's error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedFile {
    pub path: String,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesInfo {
    /// The image list, `images.txt`.
    pub file: String,
    /// Lines of the image list.
    pub listed: usize,
    /// Images that decoded and are in the statistics.
    pub used: usize,
    pub skipped: Vec<SkippedFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VocabularyInfo {
    /// The vocabulary, `vocabulary.txt`.
    pub file: String,
    /// Origin: a path or `built-in …`.
    pub source: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassesInfo {
    /// The class names, `classes.txt`.
    pub file: String,
    pub source: String,
    pub count: usize,
    /// Prompt templates averaged per class embedding.
    pub templates: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The command line as given.
    pub command: Vec<String>,
    /// clip-lens version.
    pub version: String,
    /// `cpu` or the GPU adapter's name.
    pub device: String,
    /// UTC time the atlas was written, RFC 3339.
    pub date: String,
    /// Wall time of the command that wrote the atlas.
    pub seconds: f64,
    /// Number of shards the statistics were computed in.
    pub shards: usize,
}

/// One file of the atlas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the atlas directory, `/`-separated.
    pub path: String,
    pub dtype: Dtype,
    /// Tensor shape, or `[lines]` for text.
    pub shape: Vec<usize>,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl FileEntry {
    /// Describes `bytes` as the file `path`.
    pub fn describe(path: &str, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> FileEntry {
        FileEntry { path: path.into(), dtype, shape, bytes: bytes.len() as u64, sha256: sha256_hex(bytes) }
    }
}

impl Manifest {
    /// Parses `manifest.json`, checking the format name and version.
    pub fn parse(json: &str) -> Result<Manifest> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| EngineError::Input(format!("{MANIFEST} is not valid JSON: {e}")))?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some(FORMAT) {
            return Err(EngineError::Input(format!(
                "{MANIFEST}: expected format \"{FORMAT}\", found {}",
                format.map_or("none".to_string(), |f| format!("\"{f}\""))
            )));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(VERSION)) {
            return Err(EngineError::Input(format!(
                "{MANIFEST}: this reader supports atlas format version {VERSION}, found {}",
                version.map_or("none".to_string(), |v| v.to_string())
            )));
        }
        serde_json::from_value(value).map_err(|e| EngineError::Input(format!("{MANIFEST}: {e}")))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the manifest serializes")
    }

    /// Returns the entry of `path`.
    pub fn file(&self, path: &str) -> Result<&FileEntry> {
        self.files.iter().find(|f| f.path == path).ok_or_else(|| {
            EngineError::Input(format!("{MANIFEST} lists no file {path}"))
        })
    }

    /// Path of tensor `name` of block `layer`: `block{layer}/{name}.bin`.
    pub fn block_file(layer: usize, name: &str) -> String {
        format!("block{layer}/{name}.bin")
    }

    pub fn layers(&self) -> Vec<usize> {
        self.blocks.iter().map(|b| b.layer).collect()
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a file's size and SHA-256 against its manifest entry.
pub fn verify(entry: &FileEntry, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != entry.bytes {
        return Err(EngineError::Input(format!(
            "{}: expected {} bytes, found {}",
            entry.path,
            entry.bytes,
            bytes.len()
        )));
    }
    let found = sha256_hex(bytes);
    if found != entry.sha256 {
        return Err(EngineError::Input(format!(
            "{}: expected SHA-256 {}, found {found}; the file is corrupt or from another atlas",
            entry.path, entry.sha256
        )));
    }
    Ok(())
}

/// Checks dtype and byte length against the entry.
fn check(entry: &FileEntry, dtype: Dtype, bytes: &[u8]) -> Result<()> {
    if entry.dtype != dtype {
        return Err(EngineError::Input(format!(
            "{}: expected dtype {}, the manifest lists {}",
            entry.path,
            dtype.name(),
            entry.dtype.name()
        )));
    }
    let expected = entry.shape.iter().product::<usize>() * dtype.size();
    if bytes.len() != expected {
        return Err(EngineError::Input(format!(
            "{}: shape {:?} of {} needs {expected} bytes, found {}",
            entry.path,
            entry.shape,
            dtype.name(),
            bytes.len()
        )));
    }
    Ok(())
}

pub fn decode_f32(entry: &FileEntry, bytes: &[u8]) -> Result<Vec<f32>> {
    check(entry, Dtype::F32, bytes)?;
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

/// Decodes f16 values, widened to f32.
pub fn decode_f16(entry: &FileEntry, bytes: &[u8]) -> Result<Vec<f32>> {
    check(entry, Dtype::F16, bytes)?;
    Ok(bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32())
        .collect())
}

pub fn decode_u32(entry: &FileEntry, bytes: &[u8]) -> Result<Vec<u32>> {
    check(entry, Dtype::U32, bytes)?;
    Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

pub fn decode_u16(entry: &FileEntry, bytes: &[u8]) -> Result<Vec<u16>> {
    check(entry, Dtype::U16, bytes)?;
    Ok(bytes.chunks_exact(2).map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes"))).collect())
}

/// Decodes a text file into its lines, checking the line count against the entry.
pub fn decode_lines(entry: &FileEntry, bytes: &[u8]) -> Result<Vec<String>> {
    if entry.dtype != Dtype::Text {
        return Err(EngineError::Input(format!("{}: expected dtype text, the manifest lists {}", entry.path, entry.dtype.name())));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| EngineError::Input(format!("{}: not valid UTF-8: {e}", entry.path)))?;
    let lines = text_lines(text);
    if entry.shape != [lines.len()] {
        return Err(EngineError::Input(format!(
            "{}: expected shape {:?}, found {} lines",
            entry.path,
            entry.shape,
            lines.len()
        )));
    }
    Ok(lines)
}

/// Splits text written by [`encode_lines`] into its lines.
pub fn text_lines(text: &str) -> Vec<String> {
    text.strip_suffix('\n').map_or_else(Vec::new, |body| body.split('\n').map(str::to_string).collect())
}

/// Joins lines with `\n` and a final `\n`, as every text file of the atlas is stored. Lines
/// must not contain `\n`.
pub fn encode_lines<S: AsRef<str>>(lines: &[S]) -> Vec<u8> {
    let mut out = String::new();
    for line in lines {
        out.push_str(line.as_ref());
        out.push('\n');
    }
    out.into_bytes()
}

pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Rounds to the nearest f16.
pub fn encode_f16(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()
}

pub fn encode_u32(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn encode_u16(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// All tensors of one block, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct AtlasBlock {
    pub layer: usize,
    /// K.
    pub pairs: usize,
    pub neurons: usize,
    pub embed_dim: usize,
    pub k: usize,
    pub m: usize,
    /// Classes kept per neuron, c.
    pub classes_per_neuron: usize,
    /// `[K, N]`.
    pub mean_coefficients: Vec<f32>,
    /// `[d]`.
    pub mean_shared: Vec<f32>,
    /// `[N]`.
    pub threshold: Vec<f32>,
    /// `[N, d]`, widened from f16.
    pub direction: Vec<f32>,
    /// `[N]`.
    pub explained: Vec<f32>,
    /// `[N]`.
    pub selectivity: Vec<f32>,
    /// `[N, k]`.
    pub top_images: Vec<u32>,
    /// `[N, k]`.
    pub top_norms: Vec<f32>,
    /// `[N, m]`.
    pub terms: Vec<u32>,
    /// `[N, m]`.
    pub term_weights: Vec<f32>,
    /// `[N, c]`.
    pub classes: Vec<u16>,
    /// `[N, c]`.
    pub class_alignment: Vec<f32>,
}

impl AtlasBlock {
    /// Verifies and decodes every tensor of block `layer`; `read(path)` returns a file's bytes.
    /// Shapes are checked against the manifest's model, k and m.
    pub fn decode(manifest: &Manifest, layer: usize, mut read: impl FnMut(&str) -> Result<Vec<u8>>) -> Result<Self> {
        let info = manifest.blocks.iter().find(|b| b.layer == layer).ok_or_else(|| {
            EngineError::Input(format!("the atlas has no block {layer}; it has blocks {:?}", manifest.layers()))
        })?;
        let (n, d, k, m) = (manifest.model.neurons, manifest.model.embed_dim, manifest.k, manifest.m);
        let c = manifest.classes.count.min(crate::atlas::CLASSES_PER_NEURON);
        let mut load = |name: &str, shape: &[usize]| -> Result<(FileEntry, Vec<u8>)> {
            let path = Manifest::block_file(layer, name);
            let entry = manifest.file(&path)?.clone();
            if entry.shape != shape {
                return Err(EngineError::Input(format!(
                    "{path}: expected shape {shape:?}, the manifest lists {:?}",
                    entry.shape
                )));
            }
            let bytes = read(&path)?;
            verify(&entry, &bytes)?;
            Ok((entry, bytes))
        };
        let f32s = |(entry, bytes): (FileEntry, Vec<u8>)| decode_f32(&entry, &bytes);
        Ok(AtlasBlock {
            layer,
            pairs: info.pairs,
            neurons: n,
            embed_dim: d,
            k,
            m,
            classes_per_neuron: c,
            mean_coefficients: f32s(load("mean_coefficients", &[info.pairs, n])?)?,
            mean_shared: f32s(load("mean_shared", &[d])?)?,
            threshold: f32s(load("threshold", &[n])?)?,
            direction: {
                let (entry, bytes) = load("direction", &[n, d])?;
                decode_f16(&entry, &bytes)?
            },
            explained: f32s(load("explained", &[n])?)?,
            selectivity: f32s(load("selectivity", &[n])?)?,
            top_images: {
                let (entry, bytes) = load("top_images", &[n, k])?;
                decode_u32(&entry, &bytes)?
            },
            top_norms: f32s(load("top_norms", &[n, k])?)?,
            terms: {
                let (entry, bytes) = load("terms", &[n, m])?;
                decode_u32(&entry, &bytes)?
            },
            term_weights: f32s(load("term_weights", &[n, m])?)?,
            classes: {
                let (entry, bytes) = load("classes", &[n, c])?;
                decode_u16(&entry, &bytes)?
            },
            class_alignment: f32s(load("class_alignment", &[n, c])?)?,
        })
    }

    /// Returns the means as [`crate::atlas::BlockMeans`], for [`crate::atlas::significance`].
    pub fn means(&self) -> Result<crate::atlas::BlockMeans> {
        let shape = crate::atlas::BlockShape {
            layer: self.layer,
            pairs: self.pairs,
            neurons: self.neurons,
            embed_dim: self.embed_dim,
        };
        crate::atlas::BlockMeans::new(shape, self.mean_coefficients.clone(), self.mean_shared.clone())
    }
}

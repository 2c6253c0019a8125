//! Partial atlas states on disk, so that shards computed by separate processes can be merged.
//!
//! A file starts with the 8 bytes `CLATPART`, the format version as a little-endian u32 and the
//! length of a JSON header as a little-endian u64. The header follows, and then the little-endian
//! arrays the header lists (name, dtype, number of values), in that order.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{
    BlockMeans, BlockShape, BlockSums, Coverage, MeansState, Slotted, StatisticsSource, TopBlock,
    TopEntry, TopState,
};
use crate::error::{EngineError, Result};

/// First bytes of every partial file.
pub const MAGIC: &[u8; 8] = b"CLATPART";

/// Version of the layout below; a reader rejects other versions.
pub const VERSION: u32 = 1;

/// A partial state of either pass.
#[derive(Clone, Debug)]
pub enum Partial {
    Means(MeansState),
    Top(TopState),
}

impl Partial {
    /// "means" or "top".
    pub fn kind(&self) -> &'static str {
        match self {
            Partial::Means(_) => "means",
            Partial::Top(_) => "top",
        }
    }

    pub fn coverage(&self) -> &Coverage {
        match self {
            Partial::Means(state) => &state.coverage,
            Partial::Top(state) => &state.coverage,
        }
    }

    /// Merges another partial state of the same kind into this one.
    pub fn merge(&mut self, other: Partial) -> Result<()> {
        match (self, other) {
            (Partial::Means(a), Partial::Means(b)) => a.merge(b),
            (Partial::Top(a), Partial::Top(b)) => a.merge(b),
            (a, b) => Err(EngineError::Input(format!(
                "cannot merge a {} state with a {} state",
                a.kind(),
                b.kind()
            ))),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Partial::Means(state) => encode_means(state),
            Partial::Top(state) => encode_top(state),
        }
    }

    /// Decodes a partial file; `name` (a path) appears in errors.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Partial> {
        let file = File::parse(bytes, name)?;
        match file.header.kind.as_str() {
            "means" => decode_means(&file).map(Partial::Means),
            "top" => decode_top(&file).map(Partial::Top),
            other => Err(file.invalid(&format!("unknown state kind '{other}'"))),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    kind: String,
    source: StatisticsSource,
    coverage: Coverage,
    /// Top images per neuron (top states only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<usize>,
    blocks: Vec<BlockShape>,
    arrays: Vec<ArrayEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ArrayEntry {
    name: String,
    dtype: String,
    len: usize,
}

/// Arrays collected for writing.
#[derive(Default)]
struct Arrays {
    entries: Vec<ArrayEntry>,
    bytes: Vec<u8>,
}

impl Arrays {
    fn push(&mut self, name: String, dtype: &str, len: usize, bytes: impl IntoIterator<Item = u8>) {
        self.entries.push(ArrayEntry { name, dtype: dtype.into(), len });
        self.bytes.extend(bytes);
    }

    fn f64s(&mut self, name: String, values: &[f64]) {
        self.push(name, "f64", values.len(), values.iter().flat_map(|v| v.to_le_bytes()));
    }

    fn f32s(&mut self, name: String, values: &[f32]) {
        self.push(name, "f32", values.len(), values.iter().flat_map(|v| v.to_le_bytes()));
    }

    fn u32s(&mut self, name: String, values: &[u32]) {
        self.push(name, "u32", values.len(), values.iter().flat_map(|v| v.to_le_bytes()));
    }

    fn finish(self, mut header: Header) -> Vec<u8> {
        header.arrays = self.entries;
        let json = serde_json::to_vec(&header).expect("the header serializes");
        let mut out = Vec::with_capacity(20 + json.len() + self.bytes.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&self.bytes);
        out
    }
}

fn header(kind: &str, source: &StatisticsSource, coverage: &Coverage, k: Option<usize>, blocks: Vec<BlockShape>) -> Header {
    Header { kind: kind.into(), source: source.clone(), coverage: coverage.clone(), k, blocks, arrays: Vec::new() }
}

fn encode_means(state: &MeansState) -> Vec<u8> {
    let mut arrays = Arrays::default();
    for sums in &state.blocks {
        let layer = sums.shape.layer;
        arrays.f64s(format!("block{layer}.coefficient_sums"), &sums.coefficients);
        arrays.f64s(format!("block{layer}.shared_sums"), &sums.shared);
    }
    arrays.finish(header("means", &state.source, &state.coverage, None, state.shapes()))
}

fn encode_top(state: &TopState) -> Vec<u8> {
    let mut arrays = Arrays::default();
    for (top, means) in state.blocks.iter().zip(&state.means) {
        let layer = top.shape.layer;
        arrays.f32s(format!("block{layer}.mean_coefficients"), &means.coefficients);
        arrays.f32s(format!("block{layer}.mean_shared"), &means.shared);
        arrays.f64s(format!("block{layer}.norm_sums"), &top.norm_sums);

        let mut counts = Vec::with_capacity(top.shape.neurons);
        let mut norms = Vec::new();
        let mut images = Vec::new();
        let mut coefficients = Vec::new();
        for n in 0..top.shape.neurons {
            let entries = top.entries(n);
            counts.push(entries.len() as u32);
            for (entry, column) in entries {
                norms.push(entry.norm);
                images.push(entry.image);
                coefficients.extend_from_slice(column);
            }
        }
        let kept: BTreeSet<u32> = images.iter().copied().collect();
        let shared: Vec<f32> = kept
            .iter()
            .flat_map(|image| top.shared(*image).expect("every kept image has a shared vector").iter().copied())
            .collect();
        let kept: Vec<u32> = kept.into_iter().collect();

        arrays.u32s(format!("block{layer}.entry_counts"), &counts);
        arrays.f32s(format!("block{layer}.entry_norms"), &norms);
        arrays.u32s(format!("block{layer}.entry_images"), &images);
        arrays.f32s(format!("block{layer}.entry_coefficients"), &coefficients);
        arrays.u32s(format!("block{layer}.shared_images"), &kept);
        arrays.f32s(format!("block{layer}.shared_values"), &shared);
    }
    arrays.finish(header("top", &state.source, &state.coverage, Some(state.k), state.shapes()))
}

/// A parsed partial file: its header and where each array's bytes are.
struct File<'a> {
    name: &'a str,
    header: Header,
    /// Array name to its index in `header.arrays` and its bytes.
    arrays: BTreeMap<String, (usize, &'a [u8])>,
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "f64" => Some(8),
        "f32" | "u32" => Some(4),
        _ => None,
    }
}

impl<'a> File<'a> {
    fn parse(bytes: &'a [u8], name: &'a str) -> Result<File<'a>> {
        let invalid = |what: String| EngineError::Input(format!("{name} is not a valid partial atlas file: {what}"));
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err(invalid("it does not start with CLATPART".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(invalid(format!("format version {version}, expected {VERSION}")));
        }
        let length = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let end = usize::try_from(length).ok().and_then(|l| l.checked_add(20)).filter(|&e| e <= bytes.len());
        let end = end.ok_or_else(|| invalid(format!("header length {length} exceeds the file")))?;
        let header: Header =
            serde_json::from_slice(&bytes[20..end]).map_err(|e| invalid(format!("header: {e}")))?;

        let mut offset = end;
        let mut arrays = BTreeMap::new();
        for (index, entry) in header.arrays.iter().enumerate() {
            let size = dtype_size(&entry.dtype)
                .ok_or_else(|| invalid(format!("array {} has unknown dtype {}", entry.name, entry.dtype)))?;
            let byte_len = entry.len.checked_mul(size).filter(|&n| offset + n <= bytes.len()).ok_or_else(|| {
                invalid(format!("array {} of {} values runs past the end of the file", entry.name, entry.len))
            })?;
            arrays.insert(entry.name.clone(), (index, &bytes[offset..offset + byte_len]));
            offset += byte_len;
        }
        if offset != bytes.len() {
            return Err(invalid(format!("{} bytes after the last array", bytes.len() - offset)));
        }
        let file = File { name, header, arrays };
        Ok(file)
    }

    fn invalid(&self, what: &str) -> EngineError {
        EngineError::Input(format!("{} is not a valid partial atlas file: {what}", self.name))
    }

    fn array(&self, name: &str, dtype: &str, len: Option<usize>) -> Result<&'a [u8]> {
        let &(index, bytes) =
            self.arrays.get(name).ok_or_else(|| self.invalid(&format!("array {name} is missing")))?;
        let entry = &self.header.arrays[index];
        if entry.dtype != dtype {
            return Err(self.invalid(&format!("array {name} has dtype {}, expected {dtype}", entry.dtype)));
        }
        if let Some(len) = len.filter(|&l| l != entry.len) {
            return Err(self.invalid(&format!("array {name} has {} values, expected {len}", entry.len)));
        }
        Ok(bytes)
    }

    fn f64s(&self, name: &str, len: usize) -> Result<Vec<f64>> {
        let bytes = self.array(name, "f64", Some(len))?;
        Ok(bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
    }

    fn f32s(&self, name: &str, len: Option<usize>) -> Result<Vec<f32>> {
        let bytes = self.array(name, "f32", len)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }

    fn u32s(&self, name: &str, len: Option<usize>) -> Result<Vec<u32>> {
        let bytes = self.array(name, "u32", len)?;
        Ok(bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }
}

fn decode_means(file: &File) -> Result<MeansState> {
    let header = &file.header;
    let blocks = header
        .blocks
        .iter()
        .map(|&shape| {
            let layer = shape.layer;
            Ok(BlockSums {
                shape,
                coefficients: file.f64s(&format!("block{layer}.coefficient_sums"), shape.pairs * shape.neurons)?,
                shared: file.f64s(&format!("block{layer}.shared_sums"), shape.embed_dim)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let state = MeansState { source: header.source.clone(), coverage: header.coverage.clone(), blocks };
    super::check_layers(&state.source, &state.shapes()).map_err(|e| file.invalid(&e.to_string()))?;
    Ok(state)
}

fn decode_top(file: &File) -> Result<TopState> {
    let header = &file.header;
    let k = header.k.filter(|&k| k > 0).ok_or_else(|| file.invalid("a top state needs k of at least 1"))?;
    let mut means = Vec::new();
    let mut blocks = Vec::new();
    for &shape in &header.blocks {
        let BlockShape { layer, pairs, neurons, embed_dim } = shape;
        let name = |array: &str| format!("block{layer}.{array}");
        means.push(BlockMeans::new(
            shape,
            file.f32s(&name("mean_coefficients"), Some(pairs * neurons))?,
            file.f32s(&name("mean_shared"), Some(embed_dim))?,
        )?);

        let mut top = TopBlock::new(shape);
        top.norm_sums = file.f64s(&name("norm_sums"), neurons)?;
        let counts = file.u32s(&name("entry_counts"), Some(neurons))?;
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let norms = file.f32s(&name("entry_norms"), Some(total))?;
        let images = file.u32s(&name("entry_images"), Some(total))?;
        let coefficients = file.f32s(&name("entry_coefficients"), Some(total * pairs))?;
        let kept = file.u32s(&name("shared_images"), None)?;
        let shared = file.f32s(&name("shared_values"), Some(kept.len() * embed_dim))?;

        let mut entry = 0;
        for (n, &count) in counts.iter().enumerate() {
            let count = count as usize;
            if count > k {
                return Err(file.invalid(&format!("block {layer} neuron {n} has {count} entries, more than k = {k}")));
            }
            let neuron = &mut top.neurons[n];
            for slot in 0..count {
                let image = images[entry];
                if image as usize >= header.source.images_listed {
                    return Err(file.invalid(&format!("image index {image} is outside the image list")));
                }
                neuron.heap.push(Slotted { entry: TopEntry { norm: norms[entry], image }, slot });
                neuron.coefficients.extend_from_slice(&coefficients[entry * pairs..(entry + 1) * pairs]);
                entry += 1;
            }
        }
        for (i, &image) in kept.iter().enumerate() {
            top.shared.insert(image, shared[i * embed_dim..(i + 1) * embed_dim].to_vec());
        }
        if let Some(missing) = images.iter().find(|image| !top.shared.contains_key(image)) {
            return Err(file.invalid(&format!("block {layer} has no shared vector for kept image {missing}")));
        }
        blocks.push(top);
    }
    let state = TopState { source: header.source.clone(), coverage: header.coverage.clone(), k, means, blocks };
    super::check_layers(&state.source, &state.shapes()).map_err(|e| file.invalid(&e.to_string()))?;
    Ok(state)
}

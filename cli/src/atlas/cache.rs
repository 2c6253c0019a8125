//! The coefficient cache: pass 1 stores every image's scaled coefficients and shared vectors so
//! that pass 2 reads them back instead of running the model a second time.
//!
//! Layout: the 8 bytes `CLATCACH`, a little-endian u32 version, a little-endian u64 length and a
//! JSON header of that length (statistics source, shard, block shapes), then one record per
//! image: its u32 index, and per block `s c` (`K N` f32) and `shared` (`d` f32). The end marker
//! `u32::MAX` and the u64 record count close the file, so a cache cut short by a failed run is
//! rejected.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engine::atlas::{BlockShape, ScaledCoefficients};
use serde_json::Value;

const MAGIC: &[u8; 8] = b"CLATCACH";
const VERSION: u32 = 1;
const END: u32 = u32::MAX;

/// Bytes per image record.
pub fn record_bytes(shapes: &[BlockShape]) -> u64 {
    let floats: usize = shapes.iter().map(|s| s.pairs * s.neurons + s.embed_dim).sum();
    4 + 4 * floats as u64
}

pub struct CacheWriter {
    file: BufWriter<File>,
    path: PathBuf,
    records: u64,
}

impl CacheWriter {
    pub fn create(path: &Path, header: &Value) -> Result<CacheWriter> {
        let file = File::create(path).with_context(|| format!("cannot create the cache file {}", path.display()))?;
        let mut writer = CacheWriter { file: BufWriter::with_capacity(1 << 20, file), path: path.to_path_buf(), records: 0 };
        let json = serde_json::to_vec(header).expect("the header serializes");
        let mut start = Vec::with_capacity(20 + json.len());
        start.extend_from_slice(MAGIC);
        start.extend_from_slice(&VERSION.to_le_bytes());
        start.extend_from_slice(&(json.len() as u64).to_le_bytes());
        start.extend_from_slice(&json);
        writer.write_bytes(&start)?;
        Ok(writer)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).with_context(|| format!("cannot write the cache file {}", self.path.display()))
    }

    /// Appends one record per image of the batch.
    pub fn write(&mut self, images: &[usize], batch: &[ScaledCoefficients]) -> Result<()> {
        let mut bytes = Vec::new();
        for (b, &image) in images.iter().enumerate() {
            bytes.clear();
            bytes.extend_from_slice(&(image as u32).to_le_bytes());
            for block in batch {
                let (coefficients, shared) = block.image(b);
                bytes.extend(coefficients.iter().chain(shared).flat_map(|v| v.to_le_bytes()));
            }
            self.write_bytes(&bytes)?;
            self.records += 1;
        }
        Ok(())
    }

    /// Writes the end marker and flushes the file.
    pub fn finish(mut self) -> Result<()> {
        let mut end = END.to_le_bytes().to_vec();
        end.extend_from_slice(&self.records.to_le_bytes());
        self.write_bytes(&end)?;
        self.file.flush().with_context(|| format!("cannot write the cache file {}", self.path.display()))
    }
}

pub struct CacheReader {
    file: BufReader<File>,
    path: PathBuf,
    shapes: Vec<BlockShape>,
    records: u64,
    /// Whether the end marker has been read.
    ended: bool,
}

impl CacheReader {
    /// Opens a cache and checks that its header equals `header`, which describes the model,
    /// image list, blocks and shard of the running stage.
    pub fn open(path: &Path, header: &Value, shapes: &[BlockShape]) -> Result<CacheReader> {
        let file = File::open(path).with_context(|| format!("cannot open the cache file {}", path.display()))?;
        let mut reader = CacheReader {
            file: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            shapes: shapes.to_vec(),
            records: 0,
            ended: false,
        };

        let mut start = [0u8; 20];
        reader.read_exact(&mut start)?;
        if &start[..8] != MAGIC {
            bail!("{} is not a clip-lens coefficient cache", path.display());
        }
        let version = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            bail!("{}: cache version {version}, expected {VERSION}", path.display());
        }
        let length = u64::from_le_bytes(start[12..20].try_into().expect("8 bytes"));
        if length > 1 << 30 {
            bail!("{}: invalid header length {length}", path.display());
        }

        let mut json = vec![0u8; length as usize];
        reader.read_exact(&mut json)?;
        let found: Value =
            serde_json::from_slice(&json).with_context(|| format!("{}: invalid cache header", path.display()))?;
        if &found != header {
            bail!(
                "{} was written for another model, image list, block list or shard:\n  cache: {found}\n  \
                 this run: {header}\nremove it or pass the cache of this shard",
                path.display()
            );
        }
        Ok(reader)
    }

    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<()> {
        self.file.read_exact(buffer).with_context(|| {
            format!("cannot read the cache file {} (cut short by a failed run?)", self.path.display())
        })
    }

    /// Reads up to `batch` records: their image indices and the coefficients of every block.
    /// Returns `None` after the last record.
    pub fn read_batch(&mut self, batch: usize) -> Result<Option<(Vec<usize>, Vec<ScaledCoefficients>)>> {
        let mut images = Vec::with_capacity(batch);
        let mut coefficients: Vec<Vec<f32>> = vec![Vec::new(); self.shapes.len()];
        let mut shared: Vec<Vec<f32>> = vec![Vec::new(); self.shapes.len()];
        let mut word = [0u8; 4];
        while images.len() < batch && !self.ended {
            self.read_exact(&mut word)?;
            let index = u32::from_le_bytes(word);
            if index == END {
                let mut count = [0u8; 8];
                self.read_exact(&mut count)?;
                let count = u64::from_le_bytes(count);
                if count != self.records {
                    bail!("{}: the end marker counts {count} records, found {}", self.path.display(), self.records);
                }
                self.ended = true;
                break;
            }
            images.push(index as usize);
            for (i, shape) in self.shapes.clone().iter().enumerate() {
                let values = self.read_f32s(shape.pairs * shape.neurons)?;
                coefficients[i].extend(values);
                let values = self.read_f32s(shape.embed_dim)?;
                shared[i].extend(values);
            }
            self.records += 1;
        }
        if images.is_empty() {
            return Ok(None);
        }
        let blocks = self
            .shapes
            .iter()
            .zip(coefficients.into_iter().zip(shared))
            .map(|(&shape, (c, s))| Ok(ScaledCoefficients::new(shape, images.len(), c, s)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some((images, blocks)))
    }

    fn read_f32s(&mut self, count: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; 4 * count];
        self.read_exact(&mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    }
}

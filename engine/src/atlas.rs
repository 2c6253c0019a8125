//! Dataset statistics per neuron of the second-order lens (the "atlas"), computed in two passes
//! over an image set without ever holding the images x neurons x d effects.
//!
//! For a source block with K (later block, head) pairs, neuron n's effect on an image is
//! `phi_n = sum_k s c[k, n] U[k, n] + shared` (see [`crate::lens`], `s` is the per-image scale).
//! It is linear in the scaled coefficients `s c` and in `shared`, so:
//!
//! - pass 1 sums `s c` (`[K, N]`) and `shared` (`[d]`) over the images; their means give the
//!   mean effect `b_n` ([`MeansState`]);
//! - pass 2 computes every neuron's centered norm `|phi_n - b_n|` from the centered coefficients,
//!   sums it, and keeps each neuron's top k images with their centered coefficients (`[K]`) and
//!   centered shared vector (`[d]`) ([`TopState`]);
//! - finishing forms the k x d matrix of top centered effects of each neuron and takes its first
//!   right singular vector through the k x k Gram matrix ([`TopState::finish`]).
//!
//! Both passes are sums or top-k lists, so each [`Shard`] of the image list can be processed on
//! its own and the partial states merged exactly. Sums are kept in f64, and top-k lists merge by
//! norm descending, then image index ascending. [`partial`] reads and writes the states.

pub mod partial;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use burn::tensor::{Device, Tensor, TensorData};
use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::analysis::read;
use crate::error::{EngineError, Result};
use crate::lens::{BlockCoefficients, Lens};
use crate::text::{normalize_rows, TextTransformer};
use crate::tokenizer::ClipTokenizer;

/// Top images kept per neuron by default (the method's authors use 100).
pub const DEFAULT_TOP_IMAGES: usize = 100;

/// Classes kept per neuron, by largest `|<r_n, class embedding>|`.
pub const CLASSES_PER_NEURON: usize = 10;

/// Term index that fills the slots left when the pursuit selects fewer than m terms.
pub const NO_TERM: u32 = u32::MAX;

/// Floats per device chunk when forming the top effects of many neurons at once.
const CHUNK_FLOATS: usize = 1 << 22;

/// Part of the sorted image list that one process handles: the images at indices
/// `index, index + count, index + 2 count, …`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The whole image list as one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 || index >= count {
            return Err(EngineError::Input(format!(
                "invalid shard {index}/{count}: the count must be at least 1 and the index below it"
            )));
        }
        Ok(Shard { index, count })
    }

    /// Parses `i/n`, for example `0/3`.
    pub fn parse(text: &str) -> Result<Shard> {
        let invalid = || {
            EngineError::Input(format!("invalid shard '{text}'; expected INDEX/COUNT such as 0/3"))
        };
        let (index, count) = text.split_once('/').ok_or_else(invalid)?;
        let index = index.trim().parse().map_err(|_| invalid())?;
        let count = count.trim().parse().map_err(|_| invalid())?;
        Shard::new(index, count)
    }

    pub fn contains(&self, image: usize) -> bool {
        image % self.count == self.index
    }

    /// Indices of this shard's images in a list of `listed` images, increasing.
    pub fn images(&self, listed: usize) -> impl Iterator<Item = usize> {
        (self.index..listed).step_by(self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Identity of the inputs a partial state was computed from. States merge only when their
/// sources are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatisticsSource {
    /// SHA-256 (lowercase hex) of the model's weight file.
    pub weights_sha256: String,
    /// SHA-256 (lowercase hex) of the image list as `images.txt` stores it.
    pub images_sha256: String,
    /// Number of images in the list.
    pub images_listed: usize,
    /// Source blocks, increasing.
    pub layers: Vec<usize>,
}

/// Shape of one source block's statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockShape {
    pub layer: usize,
    /// (Later block, head) pairs K.
    pub pairs: usize,
    pub neurons: usize,
    pub embed_dim: usize,
}

impl BlockShape {
    /// Shapes of every block of a lens, in its order.
    pub fn of_lens(lens: &Lens) -> Result<Vec<BlockShape>> {
        lens.layers()
            .into_iter()
            .map(|layer| {
                Ok(BlockShape {
                    layer,
                    pairs: lens.pairs(layer)?,
                    neurons: lens.neurons(),
                    embed_dim: lens.embed_dim(),
                })
            })
            .collect()
    }
}

/// An image that could not be read, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedImage {
    /// Index in the image list.
    pub index: usize,
    pub path: String,
    pub error: String,
}

/// Shards and images that a partial state covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub shard_count: usize,
    /// Indices of the shards included, increasing.
    pub shards: Vec<usize>,
    /// Images included in the statistics.
    pub images: u64,
    /// Images of the included shards that could not be read, by index.
    pub skipped: Vec<SkippedImage>,
}

impl Coverage {
    fn new(shard: Shard) -> Coverage {
        Coverage { shard_count: shard.count, shards: vec![shard.index], images: 0, skipped: Vec::new() }
    }

    pub fn is_complete(&self) -> bool {
        self.shards.len() == self.shard_count
    }

    fn contains(&self, image: usize) -> bool {
        self.shards.contains(&(image % self.shard_count))
    }

    fn merge(&mut self, other: Coverage) -> Result<()> {
        if other.shard_count != self.shard_count {
            return Err(EngineError::Input(format!(
                "cannot merge a state of {} shards with one of {} shards",
                self.shard_count, other.shard_count
            )));
        }
        if let Some(shard) = other.shards.iter().find(|s| self.shards.contains(s)) {
            return Err(EngineError::Input(format!(
                "shard {shard}/{} is in both states; each shard may be merged only once",
                self.shard_count
            )));
        }
        self.shards.extend(other.shards);
        self.shards.sort_unstable();
        self.images += other.images;
        self.skipped.extend(other.skipped);
        self.skipped.sort_by_key(|s| s.index);
        Ok(())
    }

    /// Fails unless every shard is included; `stage` names what needs the complete state.
    pub fn require_complete(&self, stage: &str) -> Result<()> {
        if self.is_complete() {
            return Ok(());
        }
        let missing: Vec<String> = (0..self.shard_count)
            .filter(|s| !self.shards.contains(s))
            .map(|s| format!("{s}/{}", self.shard_count))
            .collect();
        Err(EngineError::Input(format!(
            "{stage} needs the statistics of every shard, but shards {} are missing; merge their \
             partial files first (clip-lens atlas-merge)",
            missing.join(", ")
        )))
    }
}

/// One batch of one block's coefficients on the host, with the scale applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaledCoefficients {
    pub shape: BlockShape,
    /// Images in the batch, B.
    pub images: usize,
    /// `s c`, `[B, K, N]`.
    pub coefficients: Vec<f32>,
    /// `shared`, `[B, d]`.
    pub shared: Vec<f32>,
}

impl ScaledCoefficients {
    /// Checks the lengths against the shape.
    pub fn new(shape: BlockShape, images: usize, coefficients: Vec<f32>, shared: Vec<f32>) -> Result<Self> {
        let expected = (images * shape.pairs * shape.neurons, images * shape.embed_dim);
        if (coefficients.len(), shared.len()) != expected {
            return Err(EngineError::Input(format!(
                "block {}: expected {} coefficients and {} shared values for {images} images, \
                 found {} and {}",
                shape.layer,
                expected.0,
                expected.1,
                coefficients.len(),
                shared.len()
            )));
        }
        Ok(ScaledCoefficients { shape, images, coefficients, shared })
    }

    /// Reads a batch of coefficients back from the device, multiplying `c` by the scale there.
    pub async fn read(coefficients: &BlockCoefficients, shape: BlockShape) -> Result<Self> {
        let [batch, _, _] = coefficients.c.dims();
        let scaled = coefficients.c.clone() * coefficients.scale.clone().reshape([batch, 1, 1]);
        let values = read(scaled).await?;
        let shared = read(coefficients.shared.clone()).await?;
        ScaledCoefficients::new(shape, batch, values, shared)
    }

    /// Returns the scaled coefficients `[K, N]` and shared vector `[d]` of image `b` of the batch.
    pub fn image(&self, b: usize) -> (&[f32], &[f32]) {
        let per_image = self.shape.pairs * self.shape.neurons;
        let d = self.shape.embed_dim;
        (&self.coefficients[b * per_image..(b + 1) * per_image], &self.shared[b * d..(b + 1) * d])
    }
}

/// Checks that a batch has one entry per block in the expected order and one index per image.
fn check_batch(shapes: &[BlockShape], images: &[usize], batch: &[ScaledCoefficients]) -> Result<()> {
    if batch.len() != shapes.len() {
        return Err(EngineError::Input(format!(
            "expected coefficients of {} blocks, found {}",
            shapes.len(),
            batch.len()
        )));
    }
    for (shape, block) in shapes.iter().zip(batch) {
        if block.shape != *shape {
            return Err(EngineError::Input(format!(
                "expected coefficients of shape {shape:?}, found {:?}",
                block.shape
            )));
        }
        if block.images != images.len() {
            return Err(EngineError::Input(format!(
                "block {}: {} images of coefficients for {} image indices",
                shape.layer,
                block.images,
                images.len()
            )));
        }
    }
    Ok(())
}

/// Pass-1 sums of one block, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSums {
    pub shape: BlockShape,
    /// Sum of `s c` over the images, `[K, N]`.
    pub coefficients: Vec<f64>,
    /// Sum of `shared`, `[d]`.
    pub shared: Vec<f64>,
}

/// Pass 1: the sums that give each block's mean scaled coefficients and mean shared vector.
#[derive(Clone, Debug, PartialEq)]
pub struct MeansState {
    pub source: StatisticsSource,
    pub coverage: Coverage,
    pub blocks: Vec<BlockSums>,
}

/// Fails when `shapes` do not list exactly the source's blocks.
fn check_layers(source: &StatisticsSource, shapes: &[BlockShape]) -> Result<()> {
    let layers: Vec<usize> = shapes.iter().map(|s| s.layer).collect();
    if layers != source.layers {
        return Err(EngineError::Input(format!(
            "the statistics are for blocks {:?} but the lens has blocks {layers:?}",
            source.layers
        )));
    }
    Ok(())
}

impl MeansState {
    pub fn new(source: StatisticsSource, shard: Shard, shapes: &[BlockShape]) -> Result<Self> {
        check_layers(&source, shapes)?;
        let blocks = shapes
            .iter()
            .map(|&shape| BlockSums {
                shape,
                coefficients: vec![0.0; shape.pairs * shape.neurons],
                shared: vec![0.0; shape.embed_dim],
            })
            .collect();
        Ok(MeansState { source, coverage: Coverage::new(shard), blocks })
    }

    pub fn shapes(&self) -> Vec<BlockShape> {
        self.blocks.iter().map(|b| b.shape).collect()
    }

    /// Adds one batch: `images` are the batch's indices in the image list, `batch[i]` the
    /// coefficients of block i. Rejects non-finite values, naming the image.
    pub fn add(&mut self, images: &[usize], batch: &[ScaledCoefficients]) -> Result<()> {
        check_batch(&self.shapes(), images, batch)?;
        check_indices(&self.coverage, &self.source, images)?;
        for (sums, block) in self.blocks.iter_mut().zip(batch) {
            for (b, &image) in images.iter().enumerate() {
                let (coefficients, shared) = block.image(b);
                if coefficients.iter().chain(shared).any(|v| !v.is_finite()) {
                    return Err(EngineError::Input(format!(
                        "image {image}: block {} has non-finite lens coefficients",
                        block.shape.layer
                    )));
                }
                for (sum, &v) in sums.coefficients.iter_mut().zip(coefficients) {
                    *sum += f64::from(v);
                }
                for (sum, &v) in sums.shared.iter_mut().zip(shared) {
                    *sum += f64::from(v);
                }
            }
        }
        self.coverage.images += images.len() as u64;
        Ok(())
    }

    /// Records an image of this state's shards that could not be read.
    pub fn skip(&mut self, skipped: SkippedImage) {
        self.coverage.skipped.push(skipped);
    }

    /// Adds another shard's sums.
    pub fn merge(&mut self, other: MeansState) -> Result<()> {
        check_same_source(&self.source, &other.source)?;
        if self.shapes() != other.shapes() {
            return Err(EngineError::Input("cannot merge states with different block shapes".into()));
        }
        self.coverage.merge(other.coverage)?;
        for (sums, other) in self.blocks.iter_mut().zip(other.blocks) {
            for (a, b) in sums.coefficients.iter_mut().zip(other.coefficients) {
                *a += b;
            }
            for (a, b) in sums.shared.iter_mut().zip(other.shared) {
                *a += b;
            }
        }
        Ok(())
    }

    /// Computes the means of every block. Needs every shard and at least one image.
    pub fn means(&self) -> Result<Vec<BlockMeans>> {
        self.coverage.require_complete("computing the means")?;
        if self.coverage.images == 0 {
            return Err(EngineError::Input("no image could be read, so there are no means".into()));
        }
        let count = self.coverage.images as f64;
        Ok(self
            .blocks
            .iter()
            .map(|sums| BlockMeans {
                shape: sums.shape,
                coefficients: sums.coefficients.iter().map(|s| (s / count) as f32).collect(),
                shared: sums.shared.iter().map(|s| (s / count) as f32).collect(),
            })
            .collect())
    }
}

fn check_same_source(a: &StatisticsSource, b: &StatisticsSource) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let what = if a.weights_sha256 != b.weights_sha256 {
        "model weights"
    } else if a.images_sha256 != b.images_sha256 || a.images_listed != b.images_listed {
        "image lists"
    } else {
        "blocks"
    };
    Err(EngineError::Input(format!(
        "the states were computed with different {what} (weights {} vs {}, image lists {} vs {}, \
         blocks {:?} vs {:?})",
        a.weights_sha256, b.weights_sha256, a.images_sha256, b.images_sha256, a.layers, b.layers
    )))
}

fn check_indices(coverage: &Coverage, source: &StatisticsSource, images: &[usize]) -> Result<()> {
    for &image in images {
        if image >= source.images_listed || !coverage.contains(image) {
            return Err(EngineError::Input(format!(
                "image index {image} is not in shards {:?} of {} over {} images",
                coverage.shards, coverage.shard_count, source.images_listed
            )));
        }
    }
    Ok(())
}

/// Means over an image set of one block's scaled coefficients and shared vector: they define
/// the mean effect `b_n = sum_k coefficients[k, n] U[k, n] + shared`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockMeans {
    pub shape: BlockShape,
    /// Mean of `s c`, `[K, N]`.
    pub coefficients: Vec<f32>,
    /// Mean of `shared`, `[d]`.
    pub shared: Vec<f32>,
}

impl BlockMeans {
    /// Checks the lengths against the shape.
    pub fn new(shape: BlockShape, coefficients: Vec<f32>, shared: Vec<f32>) -> Result<Self> {
        if coefficients.len() != shape.pairs * shape.neurons || shared.len() != shape.embed_dim {
            return Err(EngineError::Input(format!(
                "block {}: means need {} x {} coefficients and {} shared values, found {} and {}",
                shape.layer,
                shape.pairs,
                shape.neurons,
                shape.embed_dim,
                coefficients.len(),
                shared.len()
            )));
        }
        Ok(BlockMeans { shape, coefficients, shared })
    }

    /// Copies the means to `device` as tensors `[K, N]` and `[d]`, for [`Lens::centered_norms`].
    pub fn to_device(&self, device: &Device) -> (Tensor<2>, Tensor<1>) {
        let BlockShape { pairs, neurons, embed_dim, .. } = self.shape;
        let coefficients =
            Tensor::from_data(TensorData::new(self.coefficients.clone(), [pairs, neurons]), device);
        let shared = Tensor::from_data(TensorData::new(self.shared.clone(), [embed_dim]), device);
        (coefficients, shared)
    }
}

/// Each neuron's centered norm on one image and whether it exceeds the neuron's threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSignificance {
    /// `|phi_n - b_n|` per neuron, length N.
    pub norms: Vec<f32>,
    /// `norms[n] > threshold[n]`.
    pub significant: Vec<bool>,
}

/// Computes, for every image of a batch, each neuron's centered norm `|phi_n - b_n|` from the
/// block's atlas means, and whether it exceeds the neuron's atlas threshold.
pub async fn significance(
    lens: &Lens,
    coefficients: &BlockCoefficients,
    means: &BlockMeans,
    threshold: &[f32],
) -> Result<Vec<ImageSignificance>> {
    let [batch, _, neurons] = coefficients.c.dims();
    if means.shape.layer != coefficients.layer || threshold.len() != neurons {
        return Err(EngineError::Input(format!(
            "the atlas statistics are for block {} with {} thresholds, the coefficients for \
             block {} with {neurons} neurons",
            means.shape.layer,
            threshold.len(),
            coefficients.layer
        )));
    }
    let (mean_coefficients, mean_shared) = means.to_device(&coefficients.c.device());
    let norms = read(lens.centered_norms(coefficients, &mean_coefficients, &mean_shared)?).await?;
    Ok(norms
        .chunks(neurons)
        .take(batch)
        .map(|norms| ImageSignificance {
            norms: norms.to_vec(),
            significant: norms.iter().zip(threshold).map(|(n, t)| n > t).collect(),
        })
        .collect())
}

/// One image kept for a neuron.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopEntry {
    /// Centered norm `|phi_n - b_n|`.
    pub norm: f32,
    /// Index in the image list.
    pub image: u32,
}

impl TopEntry {
    /// Ranking order: `Less` when `self` ranks before `other` (larger norm, then smaller index).
    pub fn rank(&self, other: &TopEntry) -> Ordering {
        other.norm.total_cmp(&self.norm).then(self.image.cmp(&other.image))
    }
}

/// A kept entry and the slot of its coefficients. Ordered so that the max-heap's top is the
/// entry that ranks last.
#[derive(Clone, Copy, Debug)]
struct Slotted {
    entry: TopEntry,
    slot: usize,
}

impl PartialEq for Slotted {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Slotted {}
impl PartialOrd for Slotted {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Slotted {
    fn cmp(&self, other: &Self) -> Ordering {
        self.entry.rank(&other.entry)
    }
}

/// One neuron's top-k list with the centered coefficients (`[K]`) of each kept image.
#[derive(Clone, Debug, Default)]
struct NeuronTop {
    heap: BinaryHeap<Slotted>,
    /// Slot s contains `coefficients[s K..(s + 1) K]`.
    coefficients: Vec<f32>,
}

impl NeuronTop {
    /// Keeps the entry if it ranks among the best `k`; `column(i)` gives its i-th coefficient.
    fn offer(&mut self, k: usize, pairs: usize, entry: TopEntry, column: impl Fn(usize) -> f32) -> bool {
        let slot = if self.heap.len() < k {
            self.coefficients.extend((0..pairs).map(&column));
            self.heap.len()
        } else {
            let worst = self.heap.peek().expect("a full list has entries");
            if entry.rank(&worst.entry) != Ordering::Less {
                return false;
            }
            let slot = self.heap.pop().expect("a full list has entries").slot;
            for (i, value) in self.coefficients[slot * pairs..(slot + 1) * pairs].iter_mut().enumerate() {
                *value = column(i);
            }
            slot
        };
        self.heap.push(Slotted { entry, slot });
        true
    }

    /// Entries best first, with their coefficients.
    fn sorted(&self, pairs: usize) -> Vec<(TopEntry, &[f32])> {
        let mut entries: Vec<&Slotted> = self.heap.iter().collect();
        entries.sort_by(|a, b| a.entry.rank(&b.entry));
        entries
            .into_iter()
            .map(|s| (s.entry, &self.coefficients[s.slot * pairs..(s.slot + 1) * pairs]))
            .collect()
    }
}

/// Pass-2 state of one block.
#[derive(Clone, Debug)]
pub struct TopBlock {
    pub shape: BlockShape,
    /// Sum of each neuron's centered norms over the images, `[N]`.
    pub norm_sums: Vec<f64>,
    neurons: Vec<NeuronTop>,
    /// Centered shared vectors `[d]` of the images in some neuron's list (and possibly of a few
    /// that left every list since the last pruning).
    shared: BTreeMap<u32, Vec<f32>>,
    /// Size of `shared` above which unreferenced images are dropped.
    prune_at: usize,
}

impl TopBlock {
    fn new(shape: BlockShape) -> TopBlock {
        TopBlock {
            shape,
            norm_sums: vec![0.0; shape.neurons],
            neurons: vec![NeuronTop::default(); shape.neurons],
            shared: BTreeMap::new(),
            prune_at: 1024,
        }
    }

    /// Neuron n's entries, best first, with their centered coefficients `[K]`.
    pub fn entries(&self, neuron: usize) -> Vec<(TopEntry, &[f32])> {
        self.neurons[neuron].sorted(self.shape.pairs)
    }

    /// Returns the centered shared vector of a kept image.
    pub fn shared(&self, image: u32) -> Option<&[f32]> {
        self.shared.get(&image).map(Vec::as_slice)
    }

    /// Drops the shared vectors of images that no neuron keeps, once there are many of them.
    fn prune(&mut self) {
        if self.shared.len() <= self.prune_at {
            return;
        }
        let kept: BTreeSet<u32> =
            self.neurons.iter().flat_map(|n| n.heap.iter().map(|s| s.entry.image)).collect();
        self.shared.retain(|image, _| kept.contains(image));
        self.prune_at = (2 * self.shared.len()).max(1024);
    }
}

/// Pass 2: per block and neuron the sum of centered norms and the top-k images, given the means
/// of pass 1.
#[derive(Clone, Debug)]
pub struct TopState {
    pub source: StatisticsSource,
    pub coverage: Coverage,
    /// Images kept per neuron.
    pub k: usize,
    pub means: Vec<BlockMeans>,
    pub blocks: Vec<TopBlock>,
}

impl TopState {
    pub fn new(source: StatisticsSource, shard: Shard, k: usize, means: Vec<BlockMeans>) -> Result<Self> {
        if k == 0 {
            return Err(EngineError::Input("the number of top images k must be at least 1".into()));
        }
        let shapes: Vec<BlockShape> = means.iter().map(|m| m.shape).collect();
        check_layers(&source, &shapes)?;
        let blocks = shapes.iter().map(|&shape| TopBlock::new(shape)).collect();
        Ok(TopState { source, coverage: Coverage::new(shard), k, means, blocks })
    }

    pub fn shapes(&self) -> Vec<BlockShape> {
        self.blocks.iter().map(|b| b.shape).collect()
    }

    /// Adds one batch: `images` are the batch's indices in the image list, `batch[i]` the
    /// coefficients of block i. The centered norms are computed on the lens's device.
    pub async fn add(&mut self, lens: &Lens, images: &[usize], batch: &[ScaledCoefficients]) -> Result<()> {
        check_batch(&self.shapes(), images, batch)?;
        check_indices(&self.coverage, &self.source, images)?;
        let device = lens_device(lens, batch)?;
        let k = self.k;
        for ((top, means), block) in self.blocks.iter_mut().zip(&self.means).zip(batch) {
            let BlockShape { layer, pairs, neurons, embed_dim } = top.shape;
            let count = images.len();
            let centered: Vec<f32> = block
                .coefficients
                .chunks(pairs * neurons)
                .flat_map(|image| image.iter().zip(&means.coefficients).map(|(v, m)| v - m))
                .collect();
            let shared: Vec<f32> = block
                .shared
                .chunks(embed_dim)
                .flat_map(|image| image.iter().zip(&means.shared).map(|(v, m)| v - m))
                .collect();
            let coefficients = BlockCoefficients {
                layer,
                c: Tensor::from_data(TensorData::new(centered.clone(), [count, pairs, neurons]), &device),
                scale: Tensor::ones([count, 1], &device),
                shared: Tensor::from_data(TensorData::new(shared.clone(), [count, embed_dim]), &device),
            };
            let norms = read(lens.effect_norms(&coefficients)?).await?;

            for (b, &image) in images.iter().enumerate() {
                let offset = b * pairs * neurons;
                let mut kept = false;
                for n in 0..neurons {
                    let norm = norms[b * neurons + n];
                    if !norm.is_finite() {
                        return Err(EngineError::Input(format!(
                            "image {image}: block {layer} neuron {n} has a non-finite centered norm"
                        )));
                    }
                    top.norm_sums[n] += f64::from(norm);
                    let entry = TopEntry { norm, image: image as u32 };
                    let column = |i: usize| centered[offset + i * neurons + n];
                    kept |= top.neurons[n].offer(k, pairs, entry, column);
                }
                if kept {
                    top.shared.insert(image as u32, shared[b * embed_dim..(b + 1) * embed_dim].to_vec());
                }
            }
            top.prune();
        }
        self.coverage.images += images.len() as u64;
        Ok(())
    }

    /// Records an image of this state's shards that could not be read.
    pub fn skip(&mut self, skipped: SkippedImage) {
        self.coverage.skipped.push(skipped);
    }

    /// Adds another shard's norm sums and merges the top-k lists.
    pub fn merge(&mut self, other: TopState) -> Result<()> {
        check_same_source(&self.source, &other.source)?;
        if self.k != other.k {
            return Err(EngineError::Input(format!(
                "cannot merge states that keep {} and {} top images",
                self.k, other.k
            )));
        }
        if self.means != other.means {
            return Err(EngineError::Input(
                "the states were computed with different means; every shard's pass 2 must use the \
                 same merged means file"
                    .into(),
            ));
        }
        self.coverage.merge(other.coverage)?;
        let k = self.k;
        for (top, other) in self.blocks.iter_mut().zip(other.blocks) {
            let pairs = top.shape.pairs;
            for (sum, value) in top.norm_sums.iter_mut().zip(&other.norm_sums) {
                *sum += value;
            }
            for (mine, theirs) in top.neurons.iter_mut().zip(&other.neurons) {
                for (entry, coefficients) in theirs.sorted(pairs) {
                    mine.offer(k, pairs, entry, |i| coefficients[i]);
                }
            }
            top.shared.extend(other.shared);
            top.prune_at = 0;
            top.prune();
        }
        Ok(())
    }

    /// Computes each block's thresholds, directions, explained shares and selectivities from the
    /// complete state. `progress` is called with the number of neurons finished so far, over
    /// all blocks.
    pub async fn finish(&self, lens: &Lens, progress: &(dyn Fn(usize) + Sync)) -> Result<Vec<BlockStatistics>> {
        self.coverage.require_complete("finishing the atlas")?;
        if self.coverage.images < self.k as u64 {
            return Err(EngineError::Input(format!(
                "the atlas keeps k = {} top images per neuron but only {} images were read; use \
                 at most {} top images or more images",
                self.k, self.coverage.images, self.coverage.images
            )));
        }
        let mut done = 0;
        let mut statistics = Vec::with_capacity(self.blocks.len());
        for (top, means) in self.blocks.iter().zip(&self.means) {
            let block = finish_block(lens, self.k, self.coverage.images, top, means, &|n| progress(done + n)).await?;
            done += top.shape.neurons;
            statistics.push(block);
        }
        Ok(statistics)
    }
}

/// Returns the lens's device after checking that the batch is for it.
fn lens_device(lens: &Lens, batch: &[ScaledCoefficients]) -> Result<Device> {
    for block in batch {
        if block.shape.neurons != lens.neurons() || block.shape.embed_dim != lens.embed_dim() {
            return Err(EngineError::Input(format!(
                "coefficients of shape {:?} do not fit a lens of {} neurons and embedding width {}",
                block.shape,
                lens.neurons(),
                lens.embed_dim()
            )));
        }
    }
    Ok(lens.device())
}

/// The finished statistics of one block, as the atlas stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockStatistics {
    pub shape: BlockShape,
    /// Top images per neuron.
    pub k: usize,
    /// Mean of `s c`, `[K, N]`.
    pub mean_coefficients: Vec<f32>,
    /// Mean of `shared`, `[d]`.
    pub mean_shared: Vec<f32>,
    /// The k-th largest centered norm per neuron, `[N]`.
    pub threshold: Vec<f32>,
    /// First right singular vector of the top-k centered effects, unit length (zero when those
    /// effects are all zero), `[N, d]`.
    pub direction: Vec<f32>,
    /// `sigma_1^2 / |X|_F^2` per neuron, `[N]`.
    pub explained: Vec<f32>,
    /// Mean top-k centered norm over the mean centered norm of all images, `[N]`.
    pub selectivity: Vec<f32>,
    /// Image indices, best first, `[N, k]`.
    pub top_images: Vec<u32>,
    /// Their centered norms, `[N, k]`.
    pub top_norms: Vec<f32>,
}

async fn finish_block(
    lens: &Lens,
    k: usize,
    images: u64,
    top: &TopBlock,
    means: &BlockMeans,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<BlockStatistics> {
    let BlockShape { layer, pairs, neurons, embed_dim: d } = top.shape;
    let device = lens.device();
    let mut statistics = BlockStatistics {
        shape: top.shape,
        k,
        mean_coefficients: means.coefficients.clone(),
        mean_shared: means.shared.clone(),
        threshold: vec![0.0; neurons],
        direction: vec![0.0; neurons * d],
        explained: vec![0.0; neurons],
        selectivity: vec![0.0; neurons],
        top_images: vec![0; neurons * k],
        top_norms: vec![0.0; neurons * k],
    };

    let chunk = (CHUNK_FLOATS / (k * d.max(pairs))).max(1);
    let mut start = 0;
    while start < neurons {
        let len = chunk.min(neurons - start);
        // The top entries' centered coefficients [len, k, K] and shared vectors [len, k, d].
        let mut coefficients = Vec::with_capacity(len * k * pairs);
        let mut shared = Vec::with_capacity(len * k * d);
        for n in start..start + len {
            let entries = top.entries(n);
            if entries.len() != k {
                return Err(EngineError::Input(format!(
                    "block {layer} neuron {n} has {} top images, expected {k}",
                    entries.len()
                )));
            }
            for (i, (entry, column)) in entries.iter().enumerate() {
                statistics.top_images[n * k + i] = entry.image;
                statistics.top_norms[n * k + i] = entry.norm;
                coefficients.extend_from_slice(column);
                let vector = top.shared(entry.image).ok_or_else(|| {
                    EngineError::Input(format!(
                        "block {layer}: the state has no shared vector for top image {}",
                        entry.image
                    ))
                })?;
                shared.extend_from_slice(vector);
            }
        }
        let coefficients = Tensor::<3>::from_data(TensorData::new(coefficients, [len, k, pairs]), &device);
        let shared = Tensor::<3>::from_data(TensorData::new(shared, [len, k, d]), &device);
        let effects = coefficients.matmul(lens.neuron_basis(layer, start, len)?) + shared; // [len, k, d]
        let gram = effects.clone().matmul(effects.clone().swap_dims(1, 2)); // [len, k, k]
        let effects = read(effects).await?;
        let gram = read(gram).await?;

        for i in 0..len {
            let n = start + i;
            let x = &effects[i * k * d..(i + 1) * k * d];
            let direction = first_direction(x, &gram[i * k * k..(i + 1) * k * k], k, d);
            statistics.direction[n * d..(n + 1) * d].copy_from_slice(&direction.vector);
            statistics.explained[n] = direction.explained as f32;
            let norms = &statistics.top_norms[n * k..(n + 1) * k];
            statistics.threshold[n] = norms[k - 1];
            let top_mean = norms.iter().map(|&v| f64::from(v)).sum::<f64>() / k as f64;
            let mean = top.norm_sums[n] / images as f64;
            statistics.selectivity[n] = if mean > 0.0 { (top_mean / mean) as f32 } else { 0.0 };
        }
        start += len;
        progress(start);
    }
    Ok(statistics)
}

/// The first right singular vector of a k x d matrix and the share of `|X|_F^2` it explains.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// Unit length, or zero when X is zero.
    pub vector: Vec<f32>,
    pub explained: f64,
}

/// Computes the first right singular vector `r` of X (`[k, d]`, row-major) from its Gram
/// matrix `X X^T` (`[k, k]`): with `u` the Gram matrix's top eigenvector, `r = X^T u / |X^T u|`,
/// formed in f64 from X. The sign makes more than half of the rows of X have a positive dot
/// product with `r`. When exactly half do, the sign makes the sum of the dot products positive.
pub fn first_direction(x: &[f32], gram: &[f32], k: usize, d: usize) -> Direction {
    let mut matrix = DMatrix::<f64>::zeros(k, k);
    for i in 0..k {
        for j in 0..k {
            // Symmetrize: the device's f32 products need not be exactly symmetric.
            matrix[(i, j)] = 0.5 * (f64::from(gram[i * k + j]) + f64::from(gram[j * k + i]));
        }
    }
    let eigen = SymmetricEigen::new(matrix);
    let top = eigen.eigenvalues.imax();
    let u = eigen.eigenvectors.column(top);

    let mut vector = vec![0.0f64; d];
    for (i, &weight) in u.iter().enumerate() {
        for (v, &value) in vector.iter_mut().zip(&x[i * d..(i + 1) * d]) {
            *v += weight * f64::from(value);
        }
    }
    let sigma_squared: f64 = vector.iter().map(|v| v * v).sum();
    let total: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    if sigma_squared == 0.0 || total == 0.0 {
        return Direction { vector: vec![0.0; d], explained: 0.0 };
    }
    let sigma = sigma_squared.sqrt();
    for v in &mut vector {
        *v /= sigma;
    }

    let dots: Vec<f64> = (0..k)
        .map(|i| x[i * d..(i + 1) * d].iter().zip(&vector).map(|(&a, b)| f64::from(a) * b).sum())
        .collect();
    let positive = dots.iter().filter(|&&v| v > 0.0).count();
    let negative = dots.iter().filter(|&&v| v < 0.0).count();
    let flip = if 2 * positive > k {
        false
    } else if 2 * negative > k {
        true
    } else {
        dots.iter().sum::<f64>() < 0.0
    };
    let sign = if flip { -1.0 } else { 1.0 };
    Direction {
        vector: vector.iter().map(|v| (sign * v) as f32).collect(),
        explained: (sigma_squared / total).min(1.0),
    }
}

/// Embeds the classes for zero-shot classification: every prompt of a class embedded and
/// normalized to unit length, averaged over the class's prompts, and normalized again.
/// `prompts[c]` are class c's prompts (the templates filled with its name). Returns `[C, d]`.
/// `progress` is called with the number of classes embedded so far.
pub fn class_embeddings(
    tower: &TextTransformer,
    tokenizer: &ClipTokenizer,
    prompts: &[Vec<String>],
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Tensor<2>> {
    if let Some(class) = prompts.iter().position(Vec::is_empty) {
        return Err(EngineError::Input(format!("class {class} has no prompts")));
    }
    // Classes per call of the text tower: about 2048 prompts, enough for full batches of the
    // tower and a progress report every few seconds.
    let per_call = (2048 / prompts.iter().map(Vec::len).max().unwrap_or(1)).max(1);
    let mut rows = Vec::with_capacity(prompts.len());
    let mut done = 0;
    for group in prompts.chunks(per_call) {
        let texts: Vec<&str> = group.iter().flatten().map(String::as_str).collect();
        let embedded = tower.embed_texts_normalized(tokenizer, &texts)?;
        let mut offset = 0;
        for class in group {
            rows.push(embedded.clone().narrow(0, offset, class.len()).mean_dim(0));
            offset += class.len();
        }
        done += group.len();
        progress(done);
    }
    if rows.is_empty() {
        return Ok(Tensor::zeros([0, tower.embed_dim()], &tower.device()));
    }
    Ok(normalize_rows(Tensor::cat(rows, 0)))
}

/// Finds, per neuron, the `keep` classes with the largest `|<direction, class embedding>|`,
/// largest first (equal values by class index), with the signed values. Returns the class
/// indices and the values, both `[N, keep]`, and `keep = min(CLASSES_PER_NEURON, C)`.
/// `directions` is `[N, d]`, `classes` `[C, d]`.
pub async fn class_alignment(
    directions: &[f32],
    classes: &Tensor<2>,
) -> Result<(Vec<u16>, Vec<f32>, usize)> {
    let [count, d] = classes.dims();
    if count > usize::from(u16::MAX) + 1 {
        return Err(EngineError::Input(format!(
            "{count} classes do not fit the atlas's 16-bit class indices (at most 65536)"
        )));
    }
    if d == 0 || directions.len() % d != 0 {
        return Err(EngineError::Input(format!(
            "{} direction values are not a whole number of rows of width {d}",
            directions.len()
        )));
    }
    let neurons = directions.len() / d;
    let keep = CLASSES_PER_NEURON.min(count);
    let device = classes.device();
    let directions = Tensor::<2>::from_data(TensorData::new(directions.to_vec(), [neurons, d]), &device);
    let values = read(directions.matmul(classes.clone().transpose())).await?; // [N, C]

    let mut indices = Vec::with_capacity(neurons * keep);
    let mut alignment = Vec::with_capacity(neurons * keep);
    for row in values.chunks(count.max(1)).take(neurons) {
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()).then(a.cmp(&b)));
        for &class in &order[..keep] {
            indices.push(class as u16);
            alignment.push(row[class]);
        }
    }
    Ok((indices, alignment, keep))
}

/// Lays out pursuit results as the atlas stores them: `[count, m]` term indices and weights in
/// selection order, with [`NO_TERM`] and weight 0 after a pursuit that stopped early.
pub fn term_arrays(results: &[Vec<(usize, f64)>], m: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut terms = Vec::with_capacity(results.len() * m);
    let mut weights = Vec::with_capacity(results.len() * m);
    for (row, selected) in results.iter().enumerate() {
        if selected.len() > m {
            return Err(EngineError::Input(format!(
                "direction {row} has {} terms, more than m = {m}",
                selected.len()
            )));
        }
        for &(atom, weight) in selected {
            let atom = u32::try_from(atom).ok().filter(|&a| a != NO_TERM).ok_or_else(|| {
                EngineError::Input(format!("term index {atom} does not fit the atlas's 32-bit indices"))
            })?;
            terms.push(atom);
            weights.push(weight as f32);
        }
        terms.extend(std::iter::repeat_n(NO_TERM, m - selected.len()));
        weights.extend(std::iter::repeat_n(0.0, m - selected.len()));
    }
    Ok((terms, weights))
}

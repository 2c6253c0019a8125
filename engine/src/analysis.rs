//! One call from CLIP-normalized pixels to what the page and the command line show per image:
//! the embedding, and per analysed block the neurons' effect norms and post-activations, and,
//! when an atlas gave the block's means and thresholds, each neuron's centered norm and whether
//! the image is significant for it.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};

use crate::atlas::{significance, BlockMeans};

use crate::config::ClipConfig;
use crate::error::{EngineError, Result};
use crate::lens::Lens;
use crate::model::{ClipModel, RecordOptions};

/// Results for one source block of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerAnalysis {
    pub layer: usize,
    pub tokens: usize,
    pub neurons: usize,
    /// `|phi_n|` for every neuron, length N.
    pub effect_norms: Vec<f32>,
    /// Post-activations `[tokens, neurons]`, row-major; token 0 is the class token.
    pub mlp_post: Vec<f32>,
    /// `|phi_n - b_n|` for every neuron, with the atlas's mean effects `b_n`; `None` without
    /// atlas statistics for the block.
    pub centered_norms: Option<Vec<f32>>,
    /// Whether each neuron's centered norm exceeds its atlas threshold; empty without atlas
    /// statistics for the block.
    pub significant: Vec<bool>,
}

/// Results for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageAnalysis {
    /// Unnormalized image embedding, length d.
    pub embedding: Vec<f32>,
    pub layers: Vec<LayerAnalysis>,
}

/// A loaded model with its lens basis.
pub struct Analyzer {
    model: ClipModel,
    lens: Lens,
    layers: Vec<usize>,
    /// Atlas means and thresholds per source block.
    statistics: BTreeMap<usize, (BlockMeans, Vec<f32>)>,
}

impl Analyzer {
    /// Builds the lens basis for `layers` (once per model).
    pub fn new(model: ClipModel, layers: Vec<usize>) -> Result<Self> {
        let lens = Lens::new(&model.vision, &layers)?;
        Ok(Analyzer { model, lens, layers, statistics: BTreeMap::new() })
    }

    /// Gives the atlas's means and thresholds of one analysed block, so that
    /// [`analyze`](Self::analyze) also returns centered norms and significance for it.
    pub fn set_statistics(&mut self, means: BlockMeans, threshold: Vec<f32>) -> Result<()> {
        let layer = means.shape.layer;
        if !self.layers.contains(&layer) {
            return Err(EngineError::Input(format!(
                "the atlas has statistics for block {layer}, which the page does not analyse \
                 (it analyses blocks {:?})",
                self.layers
            )));
        }
        let neurons = self.model.config.vision.mlp_dim;
        if threshold.len() != neurons || means.shape.neurons != neurons {
            return Err(EngineError::Input(format!(
                "the atlas's block {layer} has {} neurons, the model {neurons}",
                threshold.len()
            )));
        }
        self.statistics.insert(layer, (means, threshold));
        Ok(())
    }

    /// Forgets all atlas statistics.
    pub fn clear_statistics(&mut self) {
        self.statistics.clear();
    }

    /// Returns whether block `layer` has atlas statistics.
    pub fn has_statistics(&self, layer: usize) -> bool {
        self.statistics.contains_key(&layer)
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn config(&self) -> &ClipConfig {
        &self.model.config
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    pub fn lens(&self) -> &Lens {
        &self.lens
    }

    /// Analyses `batch` images given as CLIP-normalized pixels laid end to end. Reads results
    /// back with `into_data_async`, which is the only readback browsers allow.
    pub async fn analyze(&self, pixels: Vec<f32>, batch: usize) -> Result<Vec<ImageAnalysis>> {
        let vision = &self.model.vision;
        let input = vision.input_tensor(pixels, batch)?;
        let output = vision.forward(input, &RecordOptions::lens(&self.layers));
        let recording = output.recording.as_ref().expect("lens recording was requested");

        let tokens = vision.config.tokens();
        let neurons = vision.config.mlp_dim;
        let mut per_layer = Vec::new();
        for &layer in &self.layers {
            let coefficients = self.lens.coefficients(&output.embedding, recording, layer)?;
            let norms = read(self.lens.effect_norms(&coefficients)?).await?;
            let post = read(recording.mlp_post[&layer].clone()).await?;
            let centered = match self.statistics.get(&layer) {
                Some((means, threshold)) => {
                    Some(significance(&self.lens, &coefficients, means, threshold).await?)
                }
                None => None,
            };
            per_layer.push((layer, norms, post, centered));
        }
        let embedding = read(output.embedding.clone()).await?;

        let embed_dim = self.model.config.embed_dim;
        let images = (0..batch)
            .map(|b| ImageAnalysis {
                embedding: embedding[b * embed_dim..(b + 1) * embed_dim].to_vec(),
                layers: per_layer
                    .iter()
                    .map(|(layer, norms, post, centered)| {
                        let image = centered.as_ref().map(|images| &images[b]);
                        LayerAnalysis {
                            layer: *layer,
                            tokens,
                            neurons,
                            effect_norms: norms[b * neurons..(b + 1) * neurons].to_vec(),
                            mlp_post: post[b * tokens * neurons..(b + 1) * tokens * neurons]
                                .to_vec(),
                            centered_norms: image.map(|image| image.norms.clone()),
                            significant: image.map(|image| image.significant.clone()).unwrap_or_default(),
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(images)
    }
}

/// Reads a tensor back to the host as f32 values.
pub async fn read<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>> {
    let data: TensorData = tensor
        .into_data_async()
        .await
        .map_err(|e| EngineError::Device(format!("reading a result from the device failed: {e:?}")))?;
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| EngineError::Device(format!("unexpected tensor data: {e:?}")))
}

/// Indices of the `k` largest values, largest first (NaN sorts last).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (values[a], values[b]);
        y.partial_cmp(&x).unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
    });
    order.truncate(k);
    order
}

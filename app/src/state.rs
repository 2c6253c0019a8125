//! The page's reactive state: what the views render. The engine objects themselves (device,
//! analyzer, image bytes) live in `session`, outside the reactive graph.

use std::sync::Arc;

use leptos::prelude::*;

use engine::analysis::LayerAnalysis;
use engine::image::RgbImage;
use crate::atlas::Atlas;
use crate::ranking;
use crate::route::Route;

/// Number of neurons listed per block on the image list.
pub const TOP_NEURONS: usize = 20;

#[derive(Clone, Copy)]
pub struct AppState {
    pub route: RwSignal<Route>,
    pub backend: RwSignal<BackendStatus>,
    /// The model in use; `None` until the first model is ready.
    pub model: RwSignal<Option<ModelInfo>>,
    /// Progress of the model being loaded, if any.
    pub loading: RwSignal<Option<LoadProgress>>,
    /// Finished analyses, in the order the images were added.
    pub images: RwSignal<Vec<Arc<ImageResult>>>,
    /// Images read but not analysed yet.
    pub pending: RwSignal<Vec<PendingImage>>,
    pub alerts: RwSignal<Vec<Alert>>,
    /// The model's atlas, when it has one that loaded.
    pub atlas: RwSignal<Option<Arc<Atlas>>>,
    /// The reason the model's atlas was not used, when it has one that failed to load.
    pub atlas_problem: RwSignal<Option<String>>,
    /// Whether the model's text tower and the tokenizer are loaded, for searching by text
    /// embedding.
    pub text_ready: RwSignal<bool>,
}

impl AppState {
    pub fn new(route: Route) -> Self {
        Self {
            route: RwSignal::new(route),
            backend: RwSignal::new(BackendStatus::Initializing),
            model: RwSignal::new(None),
            loading: RwSignal::new(None),
            images: RwSignal::new(Vec::new()),
            pending: RwSignal::new(Vec::new()),
            alerts: RwSignal::new(Vec::new()),
            atlas: RwSignal::new(None),
            atlas_problem: RwSignal::new(None),
            text_ready: RwSignal::new(false),
        }
    }

    /// Shows an error message in an alert and logs it.
    pub fn alert(&self, message: impl Into<String>) {
        let message = message.into();
        log::error!("{message}");
        self.alerts.update(|alerts| {
            let id = alerts.last().map_or(0, |alert| alert.id + 1);
            alerts.push(Alert { id, message });
        });
    }

    pub fn dismiss_alert(&self, id: u64) {
        self.alerts.update(|alerts| alerts.retain(|alert| alert.id != id));
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum BackendStatus {
    Initializing,
    Ready { kind: crate::gpu::BackendKind, label: String },
    /// WebGPU could not be used, for the reason in the string.
    Unavailable(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub id: u64,
    pub message: String,
}

/// The model in use, as the views describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The model directory's absolute URL.
    pub url: String,
    pub is_default: bool,
    /// Increases with every model that becomes ready; results carry the one they came from.
    pub generation: u64,
    pub blocks: usize,
    pub width: usize,
    pub heads: usize,
    pub neurons: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    /// The blocks whose neurons the page analyses.
    pub layers: Vec<usize>,
}

impl ModelInfo {
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    pub fn summary(&self) -> String {
        format!(
            "ViT with {} blocks of width {} ({} heads, {} MLP neurons each), {} px input in \
             {} px patches, {}-dimensional embedding",
            self.blocks,
            self.width,
            self.heads,
            self.neurons,
            self.image_size,
            self.patch_size,
            self.embed_dim
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadStage {
    InitializingWebGpu,
    DownloadingConfig,
    DownloadingWeights,
    /// Parsing the safetensors file and copying the tensors to the device.
    LoadingWeights,
    /// Downloading and verifying the atlas files.
    DownloadingAtlas,
    BuildingLensBasis,
    /// A first forward pass on a blank image, which compiles the GPU kernels.
    WarmingUp,
}

impl LoadStage {
    pub fn describe(self) -> &'static str {
        match self {
            LoadStage::InitializingWebGpu => "initializing WebGPU",
            LoadStage::DownloadingConfig => "downloading config",
            LoadStage::DownloadingWeights => "downloading weights",
            LoadStage::LoadingWeights => "copying weights to the device",
            LoadStage::DownloadingAtlas => "downloading the neuron atlas",
            LoadStage::BuildingLensBasis => "building lens basis",
            LoadStage::WarmingUp => "warming up (compiling GPU kernels)",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoadProgress {
    pub url: String,
    pub stage: LoadStage,
    pub received: u64,
    pub total: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PendingImage {
    pub id: u64,
    pub name: String,
    /// The current step, such as "waiting for the model".
    pub status: String,
}

/// One image's analysis, ready to render.
#[derive(Debug, PartialEq)]
pub struct ImageResult {
    pub id: u64,
    pub name: String,
    /// The model generation that produced it (see [`ModelInfo::generation`]).
    pub generation: u64,
    /// The square crop the model saw.
    pub crop: RgbImage,
    pub grid: usize,
    pub layers: Vec<LayerResult>,
}

impl ImageResult {
    pub fn layer(&self, layer: usize) -> Option<&LayerResult> {
        self.layers.iter().find(|result| result.layer == layer)
    }
}

#[derive(Debug, PartialEq)]
pub struct LayerResult {
    pub layer: usize,
    pub tokens: usize,
    pub neurons: usize,
    /// Norm of each neuron's second-order effect on the image embedding (CLIP logit units).
    pub effect_norms: Vec<f32>,
    /// Post-activations, row-major `[tokens, neurons]`.
    pub mlp_post: Vec<f32>,
    /// `|phi_n - b_n|` with the atlas's mean effects, when the model has an atlas.
    pub centered_norms: Option<Vec<f32>>,
    /// Whether the image is significant for each neuron (centered norm above the atlas's
    /// threshold); empty without an atlas.
    pub significant: Vec<bool>,
    /// The [`TOP_NEURONS`] largest effect norms as `(neuron, norm)`, largest first.
    pub top: Vec<(usize, f32)>,
}

impl LayerResult {
    pub fn new(analysis: LayerAnalysis) -> Self {
        let top = ranking::top_neurons(&analysis.effect_norms, TOP_NEURONS);
        Self {
            layer: analysis.layer,
            tokens: analysis.tokens,
            neurons: analysis.neurons,
            effect_norms: analysis.effect_norms,
            mlp_post: analysis.mlp_post,
            centered_norms: analysis.centered_norms,
            significant: analysis.significant,
            top,
        }
    }

    /// Returns whether the image is significant for `neuron` according to the atlas.
    pub fn is_significant(&self, neuron: usize) -> bool {
        self.significant.get(neuron).copied().unwrap_or(false)
    }
}

//! The engine side of the page: the compute device, the model's analyzer, the bytes of every
//! accepted image, and the async jobs that load models and analyse images.
//!
//! Everything here runs on the page's single thread. GPU work (loading weights, building the lens
//! basis, analysing an image) is serialized by one async lock, so a model switch never races an
//! analysis, and downloads run outside it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use futures::lock::Mutex;
use leptos::prelude::*;
use leptos::task::spawn_local;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use engine::analysis::Analyzer;
use engine::image::{preprocess, RgbImage};
use engine::lens::default_layers;
use engine::weights::load_clip;
use crate::fetch::{self, FetchError};
use crate::gpu::{self, Backend};
use crate::ranking::format_megabytes;
use crate::state::{
    AppState, BackendStatus, ImageResult, LayerResult, LoadProgress, LoadStage, ModelInfo,
    PendingImage,
};

/// Largest image file the page reads, in bytes. Larger files are rejected before reading, so a
/// mistaken drop of a video or disk image cannot exhaust the page's memory.
pub const MAX_IMAGE_BYTES: u64 = 50 * 1024 * 1024;

/// The model directory bundled with the site, relative to the page.
pub const DEFAULT_MODEL_URL: &str = "models/default/";

/// Config file names tried in order: Hugging Face and plain open_clip exports use the first,
/// open_clip's hub layout the second.
const CONFIG_FILES: [&str; 2] = ["config.json", "open_clip_config.json"];
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "open_clip_model.safetensors"];

struct StoredImage {
    id: u64,
    name: String,
    bytes: Rc<Vec<u8>>,
}

#[derive(Default)]
struct Session {
    backend: Option<Backend>,
    analyzer: Option<Rc<Analyzer>>,
    generation: u64,
    images: Vec<StoredImage>,
    next_image_id: u64,
    /// The model URL to load once a backend exists, kept when WebGPU failed so that choosing the
    /// CPU can continue where the page stopped.
    deferred_model: Option<String>,
}

thread_local! {
    static SESSION: RefCell<Session> = RefCell::new(Session::default());
    static GPU_LOCK: Rc<Mutex<()>> = Rc::new(Mutex::new(()));
}

fn gpu_lock() -> Rc<Mutex<()>> {
    GPU_LOCK.with(Rc::clone)
}

/// Starts the page: initializes WebGPU, then loads the model named by `?model=` or the default.
pub fn start(state: AppState) {
    let requested = query_model_url();
    spawn_local(async move {
        let url = requested.unwrap_or_else(|| DEFAULT_MODEL_URL.to_string());
        state.loading.set(Some(LoadProgress {
            url: url.clone(),
            stage: LoadStage::InitializingWebGpu,
            received: 0,
            total: None,
        }));
        match gpu::init_webgpu().await {
            Ok(backend) => {
                install_backend(state, backend);
                load_model(state, url).await;
            }
            Err(reason) => {
                state.loading.set(None);
                set_body_backend("none");
                state.backend.set(BackendStatus::Unavailable(reason.clone()));
                state.alert(format!(
                    "WebGPU is not available: {reason}. This page runs CLIP on the GPU through \
                     WebGPU; use a browser with WebGPU enabled (recent Chrome, Edge or Safari), \
                     or run it on the CPU, which is much slower."
                ));
                SESSION.with(|session| session.borrow_mut().deferred_model = Some(url));
            }
        }
    });
}

/// Switches to burn's CPU backend after WebGPU failed, then loads the model the page was opened
/// with.
pub fn use_cpu(state: AppState) {
    spawn_local(async move {
        match gpu::init_cpu().await {
            Ok(backend) => {
                install_backend(state, backend);
                let url = SESSION.with(|session| session.borrow_mut().deferred_model.take());
                load_model(state, url.unwrap_or_else(|| DEFAULT_MODEL_URL.to_string())).await;
            }
            Err(reason) => state.alert(format!("The CPU backend failed its self-test: {reason}")),
        }
    });
}

fn install_backend(state: AppState, backend: Backend) {
    log::info!("compute backend: {}", backend.label);
    set_body_backend(backend.kind.attribute());
    state.backend.set(BackendStatus::Ready { kind: backend.kind, label: backend.label.clone() });
    SESSION.with(|session| session.borrow_mut().backend = Some(backend));
}

fn set_body_backend(value: &str) {
    if let Some(body) = web_sys::window().and_then(|w| w.document()).and_then(|d| d.body()) {
        let _ = body.set_attribute("data-backend", value);
    }
}

/// Returns the `model` query parameter of the page's URL, if present and not empty.
fn query_model_url() -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    let params = web_sys::UrlSearchParams::new_with_str(&search).ok()?;
    params.get("model").filter(|url| !url.trim().is_empty())
}

/// Resolves a model directory typed by the user against the page's address and makes sure it
/// ends with `/`, so file names can be appended.
fn resolve_model_dir(input: &str) -> Result<String, String> {
    let input = input.trim();
    if input.is_empty() {
        return Err("the model address is empty".into());
    }
    let base = web_sys::window()
        .and_then(|window| window.location().href().ok())
        .ok_or("the page's own address is unavailable")?;
    let url = web_sys::Url::new_with_base(input, &base)
        .map_err(|err| format!("{input:?} is not a valid URL ({})", fetch::describe_js(&err)))?;
    if url.protocol() != "http:" && url.protocol() != "https:" {
        return Err(format!("{input:?} is not an http or https address"));
    }
    url.set_search("");
    url.set_hash("");
    let mut href = String::from(url.href());
    if !href.ends_with('/') {
        href.push('/');
    }
    Ok(href)
}

/// Starts loading the model directory `input` (as typed, or from `?model=`).
pub fn request_model(state: AppState, input: String) {
    if state.loading.get_untracked().is_some() {
        state.alert("A model is already loading; wait for it to finish before loading another.");
        return;
    }
    let has_backend = SESSION.with(|session| session.borrow().backend.is_some());
    if !has_backend {
        SESSION.with(|session| session.borrow_mut().deferred_model = Some(input));
        state.alert("No compute backend is ready, so the model cannot be loaded yet.");
        return;
    }
    spawn_local(load_model(state, input));
}

async fn load_model(state: AppState, input: String) {
    let url = match resolve_model_dir(&input) {
        Ok(url) => url,
        Err(reason) => {
            state.alert(format!("Could not load the model at {input}: {reason}."));
            return;
        }
    };
    let progress = |stage, received, total| {
        state.loading.set(Some(LoadProgress { url: url.clone(), stage, received, total }))
    };

    let result = load_model_inner(&url, &progress).await;
    state.loading.set(None);
    match result {
        Ok((analyzer, info)) => {
            log::info!("model ready: {} ({})", info.url, info.summary());
            let generation = info.generation;
            SESSION.with(|session| {
                let mut session = session.borrow_mut();
                session.analyzer = Some(Rc::new(analyzer));
                session.generation = generation;
            });
            if !info.is_default || query_model_url().is_some() {
                remember_model_in_address(&info);
            }
            state.model.set(Some(info));
            reanalyze_all(state);
        }
        Err(reason) => {
            let keeping = match state.model.get_untracked() {
                Some(previous) => format!(" The page keeps using the previous model, {}.", previous.url),
                None => " No model is loaded, so images cannot be analysed yet.".to_string(),
            };
            state.alert(format!("Could not load the model at {url}: {reason}.{keeping}"));
        }
    }
}

async fn load_model_inner(
    url: &str,
    progress: &impl Fn(LoadStage, u64, Option<u64>),
) -> Result<(Analyzer, ModelInfo), String> {
    progress(LoadStage::DownloadingConfig, 0, None);
    let (config_name, config_json) = fetch_first(url, &CONFIG_FILES, |_, _| {}).await?;
    let (weights_name, weights) = fetch_first(url, &WEIGHT_FILES, |received, total| {
        progress(LoadStage::DownloadingWeights, received, total)
    })
    .await?;
    let config_json = String::from_utf8(config_json)
        .map_err(|err| format!("{config_name} is not UTF-8 text ({err})"))?;
    log::info!("downloaded {config_name} and {weights_name} ({})", format_megabytes(weights.len() as u64));

    // Only one model load or analysis touches the device at a time.
    let lock = gpu_lock();
    let _guard = lock.lock().await;
    let device = SESSION
        .with(|session| session.borrow().backend.as_ref().map(|backend| backend.device.clone()))
        .ok_or("no compute backend is ready")?;

    progress(LoadStage::LoadingWeights, weights.len() as u64, Some(weights.len() as u64));
    yield_to_browser().await;
    let source_name = format!("{url}{weights_name}");
    let model = load_clip(&config_json, &weights, &source_name, &device).map_err(|err| err.to_string())?;
    drop(weights);

    progress(LoadStage::BuildingLensBasis, 0, None);
    yield_to_browser().await;
    let config = model.config.clone();
    let layers = default_layers(config.vision.layers);
    let analyzer = Analyzer::new(model, layers.clone()).map_err(|err| err.to_string())?;

    progress(LoadStage::WarmingUp, 0, None);
    yield_to_browser().await;
    let size = config.vision.image_size;
    analyzer
        .analyze(vec![0.0; 3 * size * size], 1)
        .await
        .map_err(|err| format!("the first forward pass failed: {err}"))?;

    let generation = SESSION.with(|session| session.borrow().generation) + 1;
    let vision = &config.vision;
    let info = ModelInfo {
        url: url.to_string(),
        is_default: resolve_model_dir(DEFAULT_MODEL_URL).is_ok_and(|default| default == url),
        generation,
        blocks: vision.layers,
        width: vision.width,
        heads: vision.heads,
        neurons: vision.mlp_dim,
        image_size: vision.image_size,
        patch_size: vision.patch_size,
        embed_dim: config.embed_dim,
        layers,
    };
    Ok((analyzer, info))
}

/// Downloads the first of `names` under `dir` that exists. Only a 404 moves on to the next name;
/// any other failure is reported at once.
async fn fetch_first(
    dir: &str,
    names: &[&str],
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> Result<(String, Vec<u8>), String> {
    for name in names {
        let url = format!("{dir}{name}");
        match fetch::fetch_bytes(&url, &mut on_progress).await {
            Ok(bytes) => return Ok((name.to_string(), bytes)),
            Err(FetchError::NotFound { .. }) => continue,
            Err(err) => return Err(err.to_string()),
        }
    }
    Err(format!("none of {} was found in {dir}", names.join(", ")))
}

/// Puts `?model=<url>` into the address bar, so that permalinks copied from it open the same
/// model. The hash route is kept.
fn remember_model_in_address(info: &ModelInfo) {
    let Some(window) = web_sys::window() else { return };
    let Ok(href) = window.location().href() else { return };
    let Ok(address) = web_sys::Url::new(&href) else { return };
    if info.is_default {
        address.search_params().delete("model");
    } else {
        address.search_params().set("model", &info.url);
    }
    if let Ok(history) = window.history() {
        let _ = history.replace_state_with_url(&wasm_bindgen::JsValue::NULL, "", Some(&address.href()));
    }
}

/// Lets the browser paint (for example the progress text) before a long synchronous step.
async fn yield_to_browser() {
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        if let Some(window) = web_sys::window() {
            let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0);
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// Accepts dropped or picked files: rejects the oversized ones, reads the rest and queues them.
pub fn add_files(state: AppState, files: Vec<web_sys::File>) {
    for file in files {
        let name = file.name();
        let size = file.size() as u64;
        if size > MAX_IMAGE_BYTES {
            state.alert(format!(
                "{name} was not read: it is {}, more than the {} limit for one image. Resize or \
                 recompress it and drop it again.",
                format_megabytes(size),
                format_megabytes(MAX_IMAGE_BYTES)
            ));
            continue;
        }

        let id = SESSION.with(|session| {
            let mut session = session.borrow_mut();
            session.next_image_id += 1;
            session.next_image_id
        });
        set_pending(state, id, &name, "reading the file");
        spawn_local(async move {
            match read_file(&file).await {
                Ok(bytes) => {
                    SESSION.with(|session| {
                        session.borrow_mut().images.push(StoredImage {
                            id,
                            name: name.clone(),
                            bytes: Rc::new(bytes),
                        })
                    });
                    analyze_image(state, id).await;
                }
                Err(reason) => {
                    clear_pending(state, id);
                    state.alert(format!("{name} could not be read: {reason}."));
                }
            }
        });
    }
}

async fn read_file(file: &web_sys::File) -> Result<Vec<u8>, String> {
    let buffer = JsFuture::from(file.array_buffer()).await.map_err(|err| fetch::describe_js(&err))?;
    let buffer: js_sys::ArrayBuffer = buffer.dyn_into().map_err(|_| "the browser returned no bytes".to_string())?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

/// Removes an image and its results.
pub fn remove_image(state: AppState, id: u64) {
    SESSION.with(|session| session.borrow_mut().images.retain(|image| image.id != id));
    state.images.update(|images| images.retain(|image| image.id != id));
    clear_pending(state, id);
}

/// Clears all results and analyses every stored image again with the current model.
fn reanalyze_all(state: AppState) {
    state.images.set(Vec::new());
    let ids: Vec<u64> = SESSION.with(|session| session.borrow().images.iter().map(|image| image.id).collect());
    for id in ids {
        spawn_local(analyze_image(state, id));
    }
}

async fn analyze_image(state: AppState, id: u64) {
    let Some((name, bytes)) = SESSION.with(|session| {
        let session = session.borrow();
        let image = session.images.iter().find(|image| image.id == id)?;
        Some((image.name.clone(), Rc::clone(&image.bytes)))
    }) else {
        return;
    };
    set_pending(state, id, &name, "waiting for the model");

    let lock = gpu_lock();
    let _guard = lock.lock().await;
    let (analyzer, generation) = SESSION.with(|session| {
        let session = session.borrow();
        (session.analyzer.clone(), session.generation)
    });
    // Without a model the image stays queued; the model becoming ready analyses it.
    let Some(analyzer) = analyzer else { return };
    let already_done = state.images.with_untracked(|images| {
        images.iter().any(|image| image.id == id && image.generation == generation)
    });
    let still_stored = SESSION.with(|session| session.borrow().images.iter().any(|image| image.id == id));
    if already_done || !still_stored {
        return;
    }

    set_pending(state, id, &name, "analysing");
    yield_to_browser().await;
    match run_analysis(&analyzer, &bytes).await {
        Ok((crop, layers)) => {
            let result = Arc::new(ImageResult {
                id,
                name,
                generation,
                crop,
                grid: analyzer.config().vision.grid_size(),
                layers,
            });
            clear_pending(state, id);
            state.images.update(|images| {
                images.retain(|image| image.id != id);
                images.push(result);
                images.sort_by_key(|image| image.id);
            });
        }
        Err(reason) => {
            remove_image(state, id);
            state.alert(format!("{name} could not be analysed: {reason}"));
        }
    }
}

async fn run_analysis(
    analyzer: &Analyzer,
    bytes: &[u8],
) -> Result<(RgbImage, Vec<LayerResult>), String> {
    let size = analyzer.config().vision.image_size;
    let preprocessed = preprocess(bytes, size).map_err(|err| err.to_string())?;
    let mut analyses = analyzer.analyze(preprocessed.pixels, 1).await.map_err(|err| err.to_string())?;
    if analyses.len() != 1 {
        return Err(format!("the engine returned {} analyses for one image", analyses.len()));
    }
    let analysis = analyses.remove(0);
    let layers = analysis
        .layers
        .into_iter()
        .map(|layer| LayerResult::new(layer.layer, layer.tokens, layer.neurons, layer.effect_norms, layer.mlp_post))
        .collect();
    Ok((preprocessed.cropped, layers))
}

fn set_pending(state: AppState, id: u64, name: &str, status: &str) {
    state.pending.update(|pending| match pending.iter_mut().find(|image| image.id == id) {
        Some(image) => image.status = status.to_string(),
        None => pending.push(PendingImage { id, name: name.to_string(), status: status.to_string() }),
    });
}

fn clear_pending(state: AppState, id: u64) {
    state.pending.update(|pending| pending.retain(|image| image.id != id));
}

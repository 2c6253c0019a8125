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

use engine::analysis::{read, Analyzer};
use engine::assets::{self as atlas_files, AtlasBlock, Manifest};
use engine::atlas::{BlockMeans, BlockShape};
use engine::image::{preprocess, RgbImage};
use engine::lens::default_layers;
use engine::text::{load_text, TextTransformer};
use engine::tokenizer::ClipTokenizer;
use engine::weights::{load_clip, WeightFile};
use crate::atlas::Atlas;
use crate::cache::{self, Expected, Source};
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
pub const DEFAULT_MODEL_URL: &str = "public/models/default/";

/// Config file names tried in order: Hugging Face and plain open_clip exports use the first,
/// open_clip's hub layout the second.
const CONFIG_FILES: [&str; 2] = ["config.json", "open_clip_config.json"];
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "open_clip_model.safetensors"];

/// The atlas of a model directory lives in this subdirectory.
const ATLAS_DIR: &str = "atlas/";

/// CLIP's tokenizer, bundled with the site (every published CLIP uses the same one).
const TOKENIZER_URL: &str = "clip-tokenizer.json";

/// The text side, for searching neurons by the embedding of a typed concept.
struct TextSide {
    tower: TextTransformer,
    tokenizer: ClipTokenizer,
}

struct StoredImage {
    id: u64,
    name: String,
    bytes: Rc<Vec<u8>>,
}

#[derive(Default)]
struct Session {
    backend: Option<Backend>,
    analyzer: Option<Rc<Analyzer>>,
    text: Option<Rc<TextSide>>,
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
        Ok(Loaded { analyzer, info, text, atlas, notes }) => {
            log::info!("model ready: {} ({})", info.url, info.summary());
            let generation = info.generation;
            SESSION.with(|session| {
                let mut session = session.borrow_mut();
                session.analyzer = Some(Rc::new(analyzer));
                session.text = text.map(Rc::new);
                session.generation = generation;
            });
            state.text_ready.set(SESSION.with(|session| session.borrow().text.is_some()));
            // Every note is about the atlas, so the first one explains why there is none.
            state.atlas_problem.set(if atlas.is_none() { notes.first().cloned() } else { None });
            state.atlas.set(atlas.map(Arc::new));
            for note in notes {
                state.alert(note);
            }
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

/// A model ready to use, with what came with it.
struct Loaded {
    analyzer: Analyzer,
    info: ModelInfo,
    text: Option<TextSide>,
    atlas: Option<Atlas>,
    /// Problems that left the model usable (a broken atlas, a missing text tower), for alerts.
    notes: Vec<String>,
}

async fn load_model_inner(
    url: &str,
    progress: &impl Fn(LoadStage, u64, Option<u64>),
) -> Result<Loaded, String> {
    let mut notes = Vec::new();
    progress(LoadStage::DownloadingConfig, 0, None);
    let (config_name, config_json) = fetch_first(url, &CONFIG_FILES, |_, _| {}).await?;
    let config_json = String::from_utf8(config_json)
        .map_err(|err| format!("{config_name} is not UTF-8 text ({err})"))?;

    // The atlas manifest names the weights by hash, which lets them come from Cache Storage.
    let atlas_url = format!("{url}{ATLAS_DIR}");
    let mut manifest = match load_manifest(&atlas_url).await {
        Ok(manifest) => manifest,
        Err(reason) => {
            notes.push(format!(
                "The atlas at {atlas_url} could not be used: {reason}. The page works without \
                 it: neurons are listed by effect norm, without texts, classes or significance."
            ));
            None
        }
    };

    let expected = manifest.as_ref().map(|manifest| manifest.model.weights_sha256.clone());
    let (weights_name, weights, weights_verified) =
        fetch_weights(url, expected.as_deref(), |received, total| {
            progress(LoadStage::DownloadingWeights, received, total)
        })
        .await?;
    if let (Some(reason), Some(_)) = (weights_verified.err(), manifest.as_ref()) {
        notes.push(format!("The atlas at {atlas_url} is not used: {reason}."));
        manifest = None;
    }
    log::info!("have {config_name} and {weights_name} ({})", format_megabytes(weights.len() as u64));

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
    let config = model.config.clone();
    let text = match load_text_side(&weights, &source_name, &config, &device).await {
        Ok(text) => Some(text),
        Err(reason) => {
            log::warn!("searching by text embedding is unavailable: {reason}");
            None
        }
    };
    drop(weights);

    let atlas = match manifest {
        Some(manifest) => match load_atlas(&atlas_url, manifest, &config, progress).await {
            Ok(atlas) => Some(atlas),
            Err(reason) => {
                notes.push(format!(
                    "The atlas at {atlas_url} could not be loaded: {reason}. The page works \
                     without it: neurons are listed by effect norm, without texts, classes or \
                     significance."
                ));
                None
            }
        },
        None => None,
    };

    progress(LoadStage::BuildingLensBasis, 0, None);
    yield_to_browser().await;
    let layers = match &atlas {
        Some(atlas) => atlas.manifest.layers(),
        None => default_layers(config.vision.layers),
    };
    let mut analyzer = Analyzer::new(model, layers.clone()).map_err(|err| err.to_string())?;
    if let Some(atlas) = &atlas {
        for block in atlas.blocks.values() {
            let shape = BlockShape {
                layer: block.layer,
                pairs: block.pairs,
                neurons: block.neurons,
                embed_dim: block.embed_dim,
            };
            let means = BlockMeans::new(shape, block.mean_coefficients.clone(), block.mean_shared.clone())
                .map_err(|err| err.to_string())?;
            analyzer.set_statistics(means, block.threshold.clone()).map_err(|err| err.to_string())?;
        }
    }

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
    Ok(Loaded { analyzer, info, text, atlas, notes })
}

/// Reads `manifest.json` of the atlas directory; `Ok(None)` when the model has no atlas.
async fn load_manifest(atlas_url: &str) -> Result<Option<Manifest>, String> {
    let Some(bytes) = cache::fetch_fresh(&format!("{atlas_url}{}", "manifest.json")).await? else {
        return Ok(None);
    };
    let json = String::from_utf8(bytes).map_err(|err| format!("manifest.json is not UTF-8 text ({err})"))?;
    Manifest::parse(&json).map(Some).map_err(|err| err.to_string())
}

/// Downloads the weights: through Cache Storage, verified against `expected_sha256` when the
/// atlas gives one, else plainly. The third value is `Ok` when the hash matched.
async fn fetch_weights(
    dir: &str,
    expected_sha256: Option<&str>,
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> Result<(String, Vec<u8>, Result<(), String>), String> {
    let Some(sha256) = expected_sha256 else {
        let (name, bytes) = fetch_first(dir, &WEIGHT_FILES, on_progress).await?;
        return Ok((name, bytes, Err("the model has no atlas".into())));
    };
    for name in WEIGHT_FILES {
        let url = format!("{dir}{name}");
        let expected = Expected::Sha256 { name, sha256 };
        match cache::fetch_verified(&url, expected, &mut on_progress).await {
            Ok((bytes, source)) => {
                if source == Source::Cache {
                    log::info!("{url} came from Cache Storage");
                }
                return Ok((name.to_string(), bytes, Ok(())));
            }
            Err(cache::Failure::Fetch(FetchError::NotFound { .. })) => continue,
            Err(cache::Failure::Fetch(err)) => return Err(err.to_string()),
            Err(cache::Failure::Mismatch { bytes, reason }) => {
                return Ok((name.to_string(), bytes, Err(reason)));
            }
        }
    }
    Err(format!("none of {} was found in {dir}", WEIGHT_FILES.join(", ")))
}

/// Loads the text tower from the weights and the bundled tokenizer.
async fn load_text_side(
    weights: &[u8],
    source_name: &str,
    config: &engine::ClipConfig,
    device: &engine::Device,
) -> Result<TextSide, String> {
    let file = WeightFile::parse(weights, source_name).map_err(|err| err.to_string())?;
    let tower = load_text(&file, config, device).map_err(|err| err.to_string())?;
    let bytes = fetch::fetch_bytes(TOKENIZER_URL, |_, _| {}).await.map_err(|err| err.to_string())?;
    let tokenizer = ClipTokenizer::from_bytes(&bytes, TOKENIZER_URL)
        .and_then(|tokenizer| tokenizer.with_context_length(config.text.context_length))
        .map_err(|err| err.to_string())?;
    Ok(TextSide { tower, tokenizer })
}

/// Downloads, verifies and decodes every file of the atlas.
async fn load_atlas(
    atlas_url: &str,
    manifest: Manifest,
    config: &engine::ClipConfig,
    progress: &impl Fn(LoadStage, u64, Option<u64>),
) -> Result<Atlas, String> {
    let model = &manifest.model;
    if model.neurons != config.vision.mlp_dim
        || model.embed_dim != config.embed_dim
        || model.layers != config.vision.layers
    {
        return Err(format!(
            "it was built for a model with {} blocks of {} neurons and a {}-dimensional \
             embedding, but this model has {} blocks of {} neurons and a {}-dimensional embedding",
            model.layers,
            model.neurons,
            model.embed_dim,
            config.vision.layers,
            config.vision.mlp_dim,
            config.embed_dim
        ));
    }
    if let Some(block) = manifest.blocks.iter().find(|block| block.layer + 1 >= config.vision.layers) {
        return Err(format!("its block {} has no later block in this model", block.layer));
    }

    // images.txt is for the command line; the page does not need it.
    let needed: Vec<_> = manifest.files.iter().filter(|entry| entry.path != manifest.images.file).collect();
    let total: u64 = needed.iter().map(|entry| entry.bytes).sum();
    let mut files = std::collections::HashMap::new();
    let mut done = 0u64;
    progress(LoadStage::DownloadingAtlas, 0, Some(total));
    for entry in needed {
        let url = format!("{atlas_url}{}", entry.path);
        let (bytes, _) = cache::fetch_verified(&url, Expected::Entry(entry), |received, _| {
            progress(LoadStage::DownloadingAtlas, done + received, Some(total))
        })
        .await
        .map_err(|err| err.to_string())?;
        done += entry.bytes;
        files.insert(entry.path.clone(), bytes);
    }
    progress(LoadStage::DownloadingAtlas, total, Some(total));

    let mut take = |path: &str| -> engine::Result<Vec<u8>> {
        files.remove(path).ok_or_else(|| engine::EngineError::Input(format!("{path} was not downloaded")))
    };
    let mut blocks = std::collections::BTreeMap::new();
    for layer in manifest.layers() {
        let block = AtlasBlock::decode(&manifest, layer, &mut take).map_err(|err| err.to_string())?;
        blocks.insert(layer, block);
    }
    let lines = |info_file: &str, take: &mut dyn FnMut(&str) -> engine::Result<Vec<u8>>| {
        let entry = manifest.file(info_file)?;
        atlas_files::decode_lines(entry, &take(info_file)?)
    };
    let vocabulary = lines(&manifest.vocabulary.file, &mut take).map_err(|err| err.to_string())?;
    let classes = lines(&manifest.classes.file, &mut take).map_err(|err| err.to_string())?;
    let embeddings_entry = manifest.file(VOCABULARY_EMBEDDINGS).map_err(|err| err.to_string())?;
    let vocabulary_embeddings = atlas_files::decode_f16(embeddings_entry, &take(VOCABULARY_EMBEDDINGS).map_err(|err| err.to_string())?)
        .map_err(|err| err.to_string())?;
    Ok(Atlas {
        manifest,
        blocks,
        vocabulary,
        classes,
        vocabulary_embeddings,
    })
}

/// Tokenizes `text` with the page's CLIP tokenizer (open_clip's ids without the zero padding).
/// Fails before a model with a text tower has loaded.
pub fn tokenize(text: &str) -> Result<Vec<u32>, String> {
    let side = SESSION.with(|session| session.borrow().text.clone()).ok_or("the tokenizer is not loaded yet")?;
    side.tokenizer.encode(text).map_err(|err| err.to_string())
}

/// The atlas file with the vocabulary's unit text embeddings.
const VOCABULARY_EMBEDDINGS: &str = "vocabulary_embeddings.bin";

/// Embeds a typed concept with the text tower, as a unit vector; `None` when the model has no
/// usable text tower.
pub async fn embed_query(query: String) -> Option<Result<Vec<f32>, String>> {
    let text = SESSION.with(|session| session.borrow().text.clone())?;
    let lock = gpu_lock();
    let _guard = lock.lock().await;
    let result = async {
        let embedding = text
            .tower
            .embed_texts_normalized(&text.tokenizer, &[query.as_str()])
            .map_err(|err| err.to_string())?;
        read(embedding).await.map_err(|err| err.to_string())
    }
    .await;
    Some(result)
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
    let result = run_analysis(&analyzer, &bytes).await;
    let still_stored = SESSION.with(|session| session.borrow().images.iter().any(|image| image.id == id));
    if !still_stored {
        // The image was removed while it was being analysed.
        return;
    }
    match result {
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
    let layers = analysis.layers.into_iter().map(LayerResult::new).collect();
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

//! The header: the tool's name, what the bars mean, the model and backend in use, the model
//! settings and the loading progress.

use leptos::prelude::*;

use crate::gpu::BackendKind;
use crate::ranking::format_megabytes;
use crate::session;
use crate::route::{search_href, Route};
use crate::state::{AppState, BackendStatus, LoadStage};

#[component]
pub fn Header() -> impl IntoView {
    view! {
        <header class="site-header">
            <h1><a href="#/">"clip-lens"</a></h1>
            <p class="tagline">
                "Which neurons of CLIP's image encoder shape the embedding of your images? Drop \
                 images below; CLIP runs on your own GPU through WebGPU, and the images never \
                 leave your device."
            </p>
            <details class="explanation">
                <summary>"What the bars mean"</summary>
                <p>
                    "For every analysed block of the vision transformer, each bar is one MLP \
                     neuron's second-order effect on the image embedding: the part of the \
                     embedding that the neuron's output contributes through the attention heads \
                     of later blocks (Gandelsman, Efros and Steinhardt, \"Interpreting the \
                     Second-Order Effects of Neurons in CLIP\", ICLR 2025). The bar's length is \
                     the norm of that effect in units of CLIP's logit scale: the embedding is \
                     scaled to norm 100, so a dot product with a unit text embedding is a CLIP \
                     logit. The page lists the 20 neurons with the largest norm per block; a \
                     neuron's page shows where in the image it fires."
                </p>
            </details>
            <ModelStatus />
            <SearchBox />
            <Progress />
        </header>
    }
}

#[component]
fn ModelStatus() -> impl IntoView {
    let state = expect_context::<AppState>();
    let model_text = move || match state.model.get() {
        Some(model) => {
            let name = if model.is_default { "the embedded default model".to_string() } else { model.url.clone() };
            format!("{name}: {}", model.summary())
        }
        None => "none loaded yet".to_string(),
    };
    let backend_text = move || match state.backend.get() {
        BackendStatus::Initializing => "starting".to_string(),
        BackendStatus::Ready { label, .. } => label,
        BackendStatus::Unavailable(_) => "WebGPU unavailable".to_string(),
    };
    let is_cpu = move || matches!(state.backend.get(), BackendStatus::Ready { kind: BackendKind::Cpu, .. });
    let offer_cpu = move || matches!(state.backend.get(), BackendStatus::Unavailable(_));

    view! {
        <dl class="status">
            <dt>"Model"</dt>
            <dd id="model" data-blocks=move || state.model.get().map(|model| model.blocks.to_string())>
                {model_text}
            </dd>
            <dt>"Compute"</dt>
            <dd>
                <span id="backend" class:cpu-warning=is_cpu>{backend_text}</span>
                <Show when=offer_cpu>
                    " "
                    <button class="secondary" on:click=move |_| session::use_cpu(state)>
                        "Run on the CPU instead (slow)"
                    </button>
                </Show>
            </dd>
        </dl>
        <ModelSettings />
    }
}

#[component]
fn ModelSettings() -> impl IntoView {
    let state = expect_context::<AppState>();
    let address = RwSignal::new(String::new());
    let busy = move || state.loading.get().is_some() || !matches!(state.backend.get(), BackendStatus::Ready { .. });

    let load = move || session::request_model(state, address.get_untracked());
    view! {
        <details class="settings">
            <summary>"Use another model"</summary>
            // novalidate: the browser's URL check rejects relative addresses such as
            // models/mine/, which the page resolves against its own address.
            <form
                class="model-form"
                novalidate=true
                on:submit=move |event| {
                    event.prevent_default();
                    load();
                }
            >
                <label for="model-url">
                    "Model directory URL (a config.json or open_clip_config.json next to a \
                     model.safetensors or open_clip_model.safetensors), for example "
                    <code>"https://huggingface.co/openai/clip-vit-base-patch32/resolve/main/"</code>
                </label>
                <div class="row">
                    <input
                        id="model-url"
                        type="url"
                        placeholder="https://…/"
                        prop:value=move || address.get()
                        on:input=move |event| address.set(event_target_value(&event))
                    />
                    <button type="submit" disabled=busy>"Load"</button>
                    <button
                        type="button"
                        class="secondary"
                        disabled=busy
                        on:click=move |_| session::request_model(state, session::DEFAULT_MODEL_URL.to_string())
                    >
                        "Default model"
                    </button>
                </div>
                <p class="hint">
                    "The page also reads the address from "<code>"?model=URL"</code>". Only the \
                     model files are downloaded; your images stay on this device."
                </p>
            </form>
        </details>
    }
}

#[component]
fn Progress() -> impl IntoView {
    let state = expect_context::<AppState>();
    move || {
        state.loading.get().map(|progress| {
            let counting = matches!(progress.stage, LoadStage::DownloadingWeights | LoadStage::DownloadingAtlas);
            let bytes = match (counting, progress.total) {
                (true, Some(total)) => {
                    format!("{} of {}", format_megabytes(progress.received), format_megabytes(total))
                }
                (true, None) => format_megabytes(progress.received),
                _ => String::new(),
            };
            // The bar is determinate only while bytes are counted against a known total.
            let fraction = match (counting, progress.total) {
                (true, Some(total)) if total > 0 => {
                    Some(progress.received as f64 / total as f64)
                }
                _ => None,
            };
            view! {
                <div class="progress" role="status" aria-live="polite">
                    <div class="progress-text">
                        <span class="stage" data-stage=format!("{:?}", progress.stage)>
                            {format!("Loading model: {}…", progress.stage.describe())}
                        </span>
                        <span class="bytes">{bytes}</span>
                    </div>
                    {match fraction {
                        Some(fraction) => view! { <progress max="1" value=fraction></progress> }.into_any(),
                        None => view! { <progress></progress> }.into_any(),
                    }}
                    <div class="progress-url">{progress.url}</div>
                </div>
            }
        })
    }
}

/// Renders the concept search field. Submitting it opens `#/search/<query>`.
#[component]
fn SearchBox() -> impl IntoView {
    let state = expect_context::<AppState>();
    let query = RwSignal::new(String::new());
    // The field shows the query of the search page on screen, also when it was opened from a
    // permalink or the browser's history.
    Effect::new(move |_| {
        if let Route::Search(current) = state.route.get() {
            query.set(current);
        }
    });
    view! {
        <form
            class="search-form"
            role="search"
            on:submit=move |event| {
                event.prevent_default();
                let text = query.get_untracked();
                if !text.trim().is_empty() {
                    if let Some(window) = web_sys::window() {
                        let _ = window.location().set_hash(&search_href(text.trim()));
                    }
                }
            }
        >
            <label for="search-input">"Find neurons for a concept"</label>
            <input
                id="search-input"
                type="search"
                placeholder="dog, stripes, water…"
                prop:value=move || query.get()
                on:input=move |event| query.set(event_target_value(&event))
            />
            <button type="submit">"Search"</button>
        </form>
    }
}

//! The clip-lens page: drop images, run CLIP on the visitor's GPU through WebGPU, and list the MLP
//! neurons with the largest second-order effect on each image's embedding.

mod atlas;
mod cache;
mod fetch;
mod gpu;
mod heatmap;
mod ranking;
mod route;
mod session;
mod state;
mod views;

use leptos::prelude::*;

use route::Route;
use state::AppState;
use views::{Alerts, DropZone, Header, NeuronPage, Results, SearchPage};

fn main() {
    std::panic::set_hook(Box::new(|info| {
        console_error_panic_hook::hook(info);
        show_panic(&info.to_string());
    }));
    let _ = console_log::init_with_level(log::Level::Info);
    leptos::mount::mount_to_body(App);
}

/// Puts a panic message on the page. A panic leaves the WebAssembly instance unusable, so this
/// writes to the DOM directly instead of going through the reactive state.
fn show_panic(message: &str) {
    let Some(document) = web_sys::window().and_then(|window| window.document()) else { return };
    let (Some(body), Ok(alert)) = (document.body(), document.create_element("div")) else { return };
    alert.set_class_name("alert panic");
    let _ = alert.set_attribute("role", "alert");
    alert.set_text_content(Some(&format!(
        "The page stopped after an internal error ({message}). Reload the page to continue."
    )));
    let _ = body.prepend_with_node_1(&alert);
}

/// The page's CLIP tokenizer for scripts and tests: `window.wasmBindings.clipLensTokenize(text)`
/// returns the ids that open_clip's tokenizer gives, without the zero padding.
#[wasm_bindgen::prelude::wasm_bindgen(js_name = clipLensTokenize)]
pub fn clip_lens_tokenize(text: &str) -> Result<Vec<u32>, wasm_bindgen::JsValue> {
    session::tokenize(text).map_err(|reason| wasm_bindgen::JsValue::from_str(&reason))
}

fn current_hash() -> String {
    web_sys::window().and_then(|window| window.location().hash().ok()).unwrap_or_default()
}

#[component]
fn App() -> impl IntoView {
    let state = AppState::new(Route::parse(&current_hash()));
    provide_context(state);

    let on_hash_change = window_event_listener(leptos::ev::hashchange, move |_| {
        state.route.set(Route::parse(&current_hash()));
        if let Some(window) = web_sys::window() {
            window.scroll_to_with_x_and_y(0.0, 0.0);
        }
    });
    // Files dropped anywhere on the page are analysed; without this the browser would navigate
    // away to the dropped file.
    let on_drag_over = window_event_listener(leptos::ev::dragover, |event| event.prevent_default());
    let on_drop = window_event_listener(leptos::ev::drop, move |event| {
        event.prevent_default();
        let files = views::dropzone_files(event.data_transfer().and_then(|transfer| transfer.files()));
        if !files.is_empty() {
            session::add_files(state, files);
        }
    });
    on_cleanup(move || {
        on_hash_change.remove();
        on_drag_over.remove();
        on_drop.remove();
    });

    session::start(state);

    let page = move || match state.route.get() {
        Route::Home => view! {
            <DropZone prompt="Drop images anywhere on this page, or choose them:" />
            <Results />
        }
        .into_any(),
        Route::Neuron { layer, index } => view! { <NeuronPage layer=layer index=index /> }.into_any(),
        Route::Search(query) => view! { <SearchPage query=query /> }.into_any(),
        Route::InvalidNeuron(hash) => view! {
            <section class="neuron-page">
                <p class="notice invalid-neuron" role="alert">
                    {format!(
                        "{hash} is not a neuron address. Neuron pages have addresses like \
                         #/neuron/9/42: a block number, then a neuron number, both counted from 0."
                    )}
                </p>
                <p><a href="#/">"Back to the image list"</a></p>
            </section>
        }
        .into_any(),
        Route::Unknown(hash) => view! {
            <section>
                <p class="notice">{format!("This page has no view at {hash}.")}</p>
                <p><a href="#/">"Back to the image list"</a></p>
            </section>
        }
        .into_any(),
    };

    view! {
        <Header />
        <main>
            <Alerts />
            {page}
        </main>
        <footer class="site-footer">
            "Second-order lens of Gandelsman, Efros and Steinhardt (ICLR 2025), computed with an exact \
             factorization; CLIP runs on burn's wgpu runtime."
        </footer>
    }
}

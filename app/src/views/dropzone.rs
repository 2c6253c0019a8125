//! The drop zone and file picker. Drops anywhere on the page are accepted (see `main.rs`); the
//! zone is the visible target and the picker for keyboard and touch users.

use leptos::prelude::*;
use wasm_bindgen::JsCast;

use crate::ranking::format_megabytes;
use crate::session::{self, MAX_IMAGE_BYTES};
use crate::state::AppState;

/// Returns the files of a `FileList` (from a file input or a drop).
pub fn file_list(files: Option<web_sys::FileList>) -> Vec<web_sys::File> {
    let Some(files) = files else { return Vec::new() };
    (0..files.length()).filter_map(|index| files.get(index)).collect()
}

#[component]
pub fn DropZone(
    /// Text above the picker.
    #[prop(into)]
    prompt: String,
) -> impl IntoView {
    let state = expect_context::<AppState>();
    let dragging = RwSignal::new(false);

    let on_change = move |event: leptos::ev::Event| {
        let Some(input) = event.target().and_then(|target| target.dyn_into::<web_sys::HtmlInputElement>().ok()) else {
            return;
        };
        session::add_files(state, file_list(input.files()));
        // Clearing the value lets the same file be picked again after it was removed.
        input.set_value("");
    };

    view! {
        <section
            class="dropzone"
            class:dragging=move || dragging.get()
            on:dragenter=move |_| dragging.set(true)
            on:dragover=move |_| dragging.set(true)
            on:dragleave=move |_| dragging.set(false)
            on:drop=move |_| dragging.set(false)
        >
            <p class="dropzone-prompt">{prompt}</p>
            <label class="file-button">
                "Choose images"
                <input id="file-input" type="file" accept="image/*" multiple on:change=on_change />
            </label>
            <p class="hint">
                {format!(
                    "PNG, JPEG, GIF, WebP, BMP or TIFF, up to {} each. Images are decoded and \
                     analysed in this tab and never uploaded.",
                    format_megabytes(MAX_IMAGE_BYTES)
                )}
            </p>
        </section>
    }
}

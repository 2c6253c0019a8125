//! The image list: every analysed image with its top neurons per block as bars.

use std::sync::Arc;

use leptos::prelude::*;

use super::canvas::PixelCanvas;
use crate::heatmap::rgb_to_rgba;
use crate::ranking::format_value;
use crate::route::neuron_href;
use crate::session;
use crate::state::{AppState, ImageResult, LayerResult, TOP_NEURONS};

#[component]
pub fn Results() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        <section class="pending" aria-live="polite">
            <For
                each=move || state.pending.get()
                key=|image| (image.id, image.status.clone())
                children=|image| {
                    view! {
                        <p class="pending-image">
                            <span class="spinner" aria-hidden="true"></span>
                            {format!("{}: {}…", image.name, image.status)}
                        </p>
                    }
                }
            />
        </section>
        <section class="results">
            <For
                each=move || state.images.get()
                key=|image| (image.id, image.generation)
                children=|image| view! { <ImageCard image=image /> }
            />
        </section>
    }
}

#[component]
fn ImageCard(image: Arc<ImageResult>) -> impl IntoView {
    let state = expect_context::<AppState>();
    let id = image.id;
    let crop = &image.crop;
    let layers: Vec<_> = image
        .layers
        .iter()
        .map(layer_bars)
        .collect();

    view! {
        <article class="image-result" data-image-name=image.name.clone()>
            <div class="image-column">
                <h2 class="image-name">{image.name.clone()}</h2>
                <PixelCanvas
                    rgba=rgb_to_rgba(&crop.data)
                    width=crop.width
                    height=crop.height
                    label=format!("{} as the model sees it ({}x{} crop)", image.name, crop.width, crop.height)
                    class="crop"
                />
                <button class="secondary" on:click=move |_| session::remove_image(state, id)>"Remove"</button>
            </div>
            <div class="layer-columns">{layers}</div>
        </article>
    }
}

fn layer_bars(layer: &LayerResult) -> impl IntoView {
    let has_atlas = layer.centered_norms.is_some();
    // Bars are scaled to the block's largest norm, so their lengths compare within one list.
    let largest = layer.top.first().map_or(0.0, |(_, norm)| *norm).max(f32::MIN_POSITIVE);
    let block = layer.layer;
    let bars: Vec<_> = layer
        .top
        .iter()
        .map(|&(neuron, norm)| {
            let percent = (100.0 * norm / largest).clamp(0.0, 100.0);
            let significant = layer.is_significant(neuron);
            let title = if significant {
                format!("Open neuron {neuron} of block {block} (significant for this image)")
            } else {
                format!("Open neuron {neuron} of block {block}")
            };
            view! {
                <li class:significant=significant>
                    <a class="neuron-bar" href=neuron_href(block, neuron) title=title>
                        <span class="significance" aria-label=if significant { "significant" } else { "" }>
                            {if significant { "\u{25cf}" } else { "" }}
                        </span>
                        <span class="neuron-index">{format!("#{neuron}")}</span>
                        <span class="bar-track">
                            <span class="bar" style=format!("width: {percent:.1}%")></span>
                        </span>
                        <span class="neuron-value">{format_value(norm)}</span>
                    </a>
                </li>
            }
        })
        .collect();

    view! {
        <section class="layer" data-layer=block>
            <h3>{format!("Block {block}")}</h3>
            <p class="layer-caption">
                {format!("Top {} of {} neurons by effect norm", layer.top.len().min(TOP_NEURONS), layer.neurons)}
            </p>
            <ol class="neuron-list">{bars}</ol>
            {has_atlas.then(|| view! {
                <p class="hint">"\u{25cf} marks the neurons this image is significant for (above the atlas threshold)."</p>
            })}
        </section>
    }
}

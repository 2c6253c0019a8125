//! The page of one neuron (`#/neuron/<layer>/<index>`): its effect norm on every loaded image and
//! a heatmap of its post-activation over each image's patch grid.

use leptos::prelude::*;

use super::canvas::PixelCanvas;
use super::DropZone;
use crate::heatmap::{blend_over, css_gradient, rgb_to_rgba};
use crate::ranking::{finite_range, format_value, neuron_map, rank_of, NeuronMap};
use crate::state::{AppState, ImageResult, ModelInfo};

#[component]
pub fn NeuronPage(layer: usize, index: usize) -> impl IntoView {
    let state = expect_context::<AppState>();
    let title = format!("Neuron {index} of block {layer}");

    let body = move || {
        let Some(model) = state.model.get() else {
            return view! { <p class="notice">"The neuron is shown once the model has loaded."</p> }.into_any();
        };
        if let Err(problem) = check_address(&model, layer, index) {
            return view! {
                <p class="notice invalid-neuron" role="alert">{problem}</p>
                <p><a href="#/">"Back to the image list"</a></p>
            }
            .into_any();
        }
        let images = state.images.get();
        if images.is_empty() {
            let pending = !state.pending.get().is_empty();
            let prompt = if pending {
                "Your images are still being analysed."
            } else {
                "No images are loaded yet, so there is nothing to show for this neuron. Drop images here, or choose them, to see where it fires."
            };
            return view! {
                <p class="notice no-images">{prompt}</p>
                <DropZone prompt="Drop images here" />
            }
            .into_any();
        }
        neuron_details(&model, &images, layer, index).into_any()
    };

    view! {
        <section class="neuron-page" data-layer=layer data-index=index>
            <p><a href="#/">"← All images"</a></p>
            <h2 id="neuron-title">{title}</h2>
            {body}
        </section>
    }
}

/// Checks that the model has block `layer`, that the page analyses it, and that it has neuron
/// `index`. The error is a sentence for the visitor.
fn check_address(model: &ModelInfo, layer: usize, index: usize) -> Result<(), String> {
    if layer >= model.blocks {
        return Err(format!(
            "This model has {} blocks, numbered 0 to {}; there is no block {layer}.",
            model.blocks,
            model.blocks.saturating_sub(1)
        ));
    }
    if !model.layers.contains(&layer) {
        let analysed: Vec<String> = model.layers.iter().map(ToString::to_string).collect();
        return Err(format!(
            "Block {layer} is not analysed by this page; the analysed blocks are {}.",
            analysed.join(", ")
        ));
    }
    if index >= model.neurons {
        return Err(format!(
            "Block {layer} has {} neurons, numbered 0 to {}; there is no neuron {index}.",
            model.neurons,
            model.neurons.saturating_sub(1)
        ));
    }
    Ok(())
}

fn neuron_details(model: &ModelInfo, images: &[std::sync::Arc<ImageResult>], layer: usize, index: usize) -> impl IntoView {
    // Each image's post-activation map of this neuron, with the image it belongs to.
    let maps: Vec<(&ImageResult, Option<NeuronMap>)> = images
        .iter()
        .map(|image| {
            let map = image.layer(layer).and_then(|result| {
                neuron_map(&result.mlp_post, result.tokens, result.neurons, model.grid(), index)
            });
            (image.as_ref(), map)
        })
        .collect();
    // One color scale for all images, so that the heatmaps compare across images.
    let range = finite_range(maps.iter().filter_map(|(_, map)| map.as_ref().map(|map| map.patches.as_slice())));
    let (low, high) = range.unwrap_or((0.0, 1.0));

    let rows: Vec<_> = maps
        .iter()
        .map(|(image, _)| {
            let result = image.layer(layer);
            let norm = result.and_then(|result| result.effect_norms.get(index).copied());
            let rank = result.and_then(|result| rank_of(&result.effect_norms, index));
            view! {
                <tr>
                    <td>{image.name.clone()}</td>
                    <td class="number effect-norm">{norm.map_or("–".to_string(), format_value)}</td>
                    <td class="number">
                        {match (rank, result) {
                            (Some(rank), Some(result)) => format!("{rank} of {}", result.neurons),
                            _ => "–".to_string(),
                        }}
                    </td>
                </tr>
            }
        })
        .collect();

    let heatmaps: Vec<_> = maps
        .into_iter()
        .map(|(image, map)| match map {
            Some(map) => {
                let crop = &image.crop;
                let rgba = blend_over(&crop.data, crop.width as usize, crop.height as usize, &map.patches, map.grid, low, high);
                view! {
                    <figure class="heatmap" data-image-name=image.name.clone()>
                        <PixelCanvas
                            rgba=rgb_to_rgba(&crop.data)
                            width=crop.width
                            height=crop.height
                            label=format!("{} as the model sees it", image.name)
                            class="crop"
                        />
                        <PixelCanvas
                            rgba=rgba
                            width=crop.width
                            height=crop.height
                            label=format!("Post-activation of neuron {index} of block {layer} over {}", image.name)
                            class="heatmap-canvas"
                        />
                        <figcaption>
                            {image.name.clone()}
                            <span class="class-token">{format!("class token: {}", format_value(map.class_token))}</span>
                        </figcaption>
                    </figure>
                }
                .into_any()
            }
            None => view! {
                <figure class="heatmap missing">
                    <figcaption>{format!("{}: no post-activations recorded for this block", image.name)}</figcaption>
                </figure>
            }
            .into_any(),
        })
        .collect();

    view! {
        <h3>"Effect norm per image"</h3>
        <table class="effect-table">
            <thead>
                <tr>
                    <th scope="col">"Image"</th>
                    <th scope="col" class="number">"Effect norm"</th>
                    <th scope="col" class="number">"Rank in block"</th>
                </tr>
            </thead>
            <tbody>{rows}</tbody>
        </table>
        <h3>"Post-activation over the patch grid"</h3>
        <p class="hint">
            {format!(
                "Each square is one of the {grid}x{grid} image patches; its color is the neuron's \
                 post-activation at that patch, on one scale for all images.",
                grid = model.grid()
            )}
        </p>
        <div class="legend">
            <span class="number">{format_value(low)}</span>
            <span class="legend-bar" style=format!("background: {}", css_gradient())></span>
            <span class="number">{format_value(high)}</span>
        </div>
        <div class="heatmaps">{heatmaps}</div>
    }
}

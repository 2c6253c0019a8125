//! The page of one neuron (`#/neuron/<layer>/<index>`): its effect norm on every loaded image and
//! a heatmap of its post-activation over each image's patch grid.

use leptos::prelude::*;

use super::canvas::PixelCanvas;
use super::DropZone;
use crate::heatmap::{blend_over, css_gradient, rgb_to_rgba};
use crate::ranking::{finite_range, format_value, neuron_map, rank_of, NeuronMap};
use crate::atlas::{Atlas, Term};
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
        let atlas = state.atlas.get();
        let described = atlas_section(atlas.as_deref(), state.atlas_problem.get(), layer, index);
        let images = state.images.get();
        if images.is_empty() {
            let pending = !state.pending.get().is_empty();
            let prompt = if pending {
                "Your images are still being analysed."
            } else {
                "No images are loaded yet, so there is nothing to show for this neuron. Drop images here, or choose them, to see where it fires."
            };
            return view! {
                {described}
                <p class="notice no-images">{prompt}</p>
                <DropZone prompt="Drop images here" />
            }
            .into_any();
        }
        view! {
            {described}
            {significant_images(atlas.is_some(), &images, layer, index)}
            {neuron_details(&model, &images, layer, index)}
        }
        .into_any()
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

/// Renders the atlas's description of the neuron, or a note that the model has none.
fn atlas_section(atlas: Option<&Atlas>, problem: Option<String>, layer: usize, index: usize) -> AnyView {
    let Some(atlas) = atlas else {
        if let Some(problem) = problem {
            return view! { <p class="notice no-atlas">{problem}</p> }.into_any();
        }
        return view! {
            <p class="notice no-atlas">
                "This model has no neuron atlas, so the neuron has no texts, classes or                  significance threshold. Build one with clip-lens atlas."
            </p>
        }
        .into_any();
    };
    let Some(summary) = atlas.neuron(layer, index) else {
        return view! { <p class="notice no-atlas">{format!("The atlas does not cover block {layer}.")}</p> }.into_any();
    };
    let images = atlas.manifest.images.used;
    let terms = |terms: Vec<Term>, class: &'static str, empty: &'static str| {
        if terms.is_empty() {
            return view! { <p class=format!("hint {class} empty")>{empty}</p> }.into_any();
        }
        let largest = terms.iter().map(|term| term.weight.abs()).fold(f32::MIN_POSITIVE, f32::max);
        let items: Vec<_> = terms
            .into_iter()
            .map(|term| {
                let percent = (100.0 * term.weight.abs() / largest).clamp(0.0, 100.0);
                view! {
                    <li class="term" data-weight=term.weight.to_string()>
                        <span class="term-text">{term.text}</span>
                        <span class="bar-track"><span class="bar" style=format!("width: {percent:.1}%")></span></span>
                        <span class="term-weight number">{format_value(term.weight)}</span>
                    </li>
                }
            })
            .collect();
        view! { <ol class=format!("terms {class}")>{items}</ol> }.into_any()
    };
    let classes: Vec<_> = summary
        .classes
        .iter()
        .map(|(name, value)| view! { <li><span class="class-name">{name.clone()}</span>" "<span class="number">{format_value(*value)}</span></li> })
        .collect();
    view! {
        <section class="atlas-summary">
            <dl class="neuron-stats">
                <dt>"Significance threshold"</dt>
                <dd class="threshold number">{format_value(summary.threshold)}</dd>
                <dt>"Selectivity"</dt>
                <dd class="selectivity number">{format_value(summary.selectivity)}</dd>
                <dt>"Variance explained by its direction"</dt>
                <dd class="explained number">{format!("{:.1}%", 100.0 * summary.explained)}</dd>
            </dl>
            <p class="hint">
                {format!(
                    "From the atlas over {images} images: an image is significant for the neuron \
                     when the norm of its effect minus the mean effect exceeds the threshold (the \
                     {}th largest over the atlas images). Selectivity is the mean of those largest \
                     norms over the mean norm; the direction is the first principal direction of \
                     the top images' effects, described below by a sparse sum of texts.",
                    atlas.manifest.k
                )}
            </p>
            <div class="term-columns">
                <div>
                    <h3>"Texts with positive weight"</h3>
                    {terms(summary.positive, "positive", "None.")}
                </div>
                <div>
                    <h3>"Texts with negative weight"</h3>
                    {terms(summary.negative, "negative", "None.")}
                </div>
            </div>
            <h3>"Most aligned ImageNet classes"</h3>
            <ol class="aligned-classes">{classes}</ol>
        </section>
    }
    .into_any()
}

/// Lists the loaded images the neuron is significant for, largest centered norm first.
fn significant_images(has_atlas: bool, images: &[std::sync::Arc<ImageResult>], layer: usize, index: usize) -> AnyView {
    if !has_atlas {
        return ().into_any();
    }
    let mut ranked: Vec<(String, f32)> = images
        .iter()
        .filter_map(|image| {
            let result = image.layer(layer)?;
            let norm = result.centered_norms.as_ref()?.get(index).copied()?;
            result.is_significant(index).then(|| (image.name.clone(), norm))
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let body = if ranked.is_empty() {
        view! { <p class="notice significant-images empty">"None of the loaded images is significant for this neuron."</p> }.into_any()
    } else {
        let items: Vec<_> = ranked
            .into_iter()
            .map(|(name, norm)| view! { <li><span class="image-name">{name}</span>" "<span class="number">{format_value(norm)}</span></li> })
            .collect();
        view! { <ol class="significant-images">{items}</ol> }.into_any()
    };
    view! {
        <h3>"Your images it is significant for"</h3>
        <p class="hint">
            "Ranked by centered norm: the norm of the neuron's effect on the image minus its mean \
             effect over the atlas images, the quantity the threshold applies to (the table below \
             shows the plain effect norm)."
        </p>
        {body}
    }
    .into_any()
}

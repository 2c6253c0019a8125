//! The concept search (`#/search/<query>`): the neurons whose atlas texts contain the concept, and
//! the neurons whose direction best matches the concept's text embedding.

use std::sync::Arc;

use leptos::prelude::*;
use leptos::task::spawn_local;

use crate::atlas::{Atlas, Hit};
use crate::ranking::format_value;
use crate::route::neuron_href;
use crate::session;
use crate::state::AppState;

/// The query's embedding and its source.
#[derive(Clone, Debug, PartialEq)]
enum Embedding {
    Pending,
    /// From the text tower.
    TextTower(Vec<f32>),
    /// From the atlas vocabulary, when the text tower is not loaded.
    Vocabulary(Vec<f32>),
    Unavailable(String),
}

#[component]
pub fn SearchPage(query: String) -> impl IntoView {
    let state = expect_context::<AppState>();
    let embedding = RwSignal::new(Embedding::Pending);
    let title = if query.trim().is_empty() {
        "Search".to_string()
    } else {
        format!("Neurons for \u{201c}{}\u{201d}", query.trim())
    };

    // Recomputed when the atlas or the text tower changes (a model finished loading).
    let query_for_effect = query.clone();
    Effect::new(move |_| {
        let atlas = state.atlas.get();
        let text_ready = state.text_ready.get();
        let query = query_for_effect.trim().to_string();
        embedding.set(Embedding::Pending);
        if query.is_empty() {
            return;
        }
        spawn_local(async move {
            let found = if text_ready {
                match session::embed_query(query.clone()).await {
                    Some(Ok(vector)) => Embedding::TextTower(vector),
                    Some(Err(reason)) => Embedding::Unavailable(format!("the text tower failed: {reason}")),
                    None => vocabulary_embedding(atlas.as_deref(), &query),
                }
            } else {
                vocabulary_embedding(atlas.as_deref(), &query)
            };
            embedding.set(found);
        });
    });

    let query_for_body = query.clone();
    let body = move || {
        let query = query_for_body.trim().to_string();
        if query.is_empty() {
            return view! { <p class="notice">"Type a concept in the search field above, for example dog or stripes."</p> }.into_any();
        }
        let Some(atlas) = state.atlas.get() else {
            let reason = if state.model.get().is_none() {
                "The search runs once the model and its atlas have loaded.".to_string()
            } else if let Some(problem) = state.atlas_problem.get() {
                problem
            } else {
                "This model has no neuron atlas, so there are no neuron texts or directions to search. \
                 Build one with `clip-lens atlas` and serve it in the model directory's atlas/ folder."
                    .to_string()
            };
            return view! { <p class="notice no-atlas">{reason}</p> }.into_any();
        };
        let by_text = atlas.search_terms(&query);
        let by_direction = move || match embedding.get() {
            Embedding::Pending => view! { <p class="notice">"Embedding the query…"</p> }.into_any(),
            Embedding::Unavailable(reason) => view! { <p class="notice">{reason}</p> }.into_any(),
            Embedding::TextTower(vector) => direction_list(&atlas, &vector, "text tower").into_any(),
            Embedding::Vocabulary(vector) => direction_list(&atlas, &vector, "vocabulary").into_any(),
        };
        view! {
            <h3>"Neurons whose texts contain it"</h3>
            {hit_list(by_text, "term-hits", "No neuron's texts contain this concept as a whole word.")}
            <h3>"Neurons whose direction matches its text embedding"</h3>
            {by_direction}
        }
        .into_any()
    };

    view! {
        <section class="search-page" data-query=query.clone()>
            <p><a href="#/">"← All images"</a></p>
            <h2 id="search-title">{title}</h2>
            {body}
        </section>
    }
}

fn vocabulary_embedding(atlas: Option<&Atlas>, query: &str) -> Embedding {
    match atlas {
        None => Embedding::Unavailable("No atlas is loaded.".into()),
        Some(atlas) => match atlas.vocabulary_embedding(query) {
            Some(vector) => Embedding::Vocabulary(vector),
            None => Embedding::Unavailable(format!(
                "The model's text tower is not loaded and \u{201c}{query}\u{201d} is not in the \
                 atlas vocabulary, so the page cannot embed it."
            )),
        },
    }
}

fn direction_list(atlas: &Arc<Atlas>, embedding: &[f32], source: &str) -> impl IntoView {
    let note = format!(
        "Dot product of each neuron's direction with the query's unit embedding (from the {source})."
    );
    view! {
        <p class="hint embedding-source" data-source=source.to_string()>{note}</p>
        {hit_list(atlas.search_direction(embedding), "direction-hits", "No neuron matches.")}
    }
}

fn hit_list(hits: Vec<Hit>, class: &'static str, empty: &'static str) -> impl IntoView {
    if hits.is_empty() {
        return view! { <p class=format!("notice {class} empty")>{empty}</p> }.into_any();
    }
    let items: Vec<_> = hits
        .into_iter()
        .map(|hit| {
            let detail = match &hit.term {
                Some(term) => format!("\u{201c}{}\u{201d} {}", term.text, format_value(term.weight)),
                None => format_value(hit.score),
            };
            view! {
                <li>
                    <a class="neuron-link" href=neuron_href(hit.layer, hit.neuron)>
                        {format!("block {}, neuron {}", hit.layer, hit.neuron)}
                    </a>
                    " "
                    <span class="hit-detail">{detail}</span>
                </li>
            }
        })
        .collect();
    view! { <ol class=format!("hits {class}")>{items}</ol> }.into_any()
}

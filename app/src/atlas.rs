//! The atlas the page loaded with its model: per-neuron texts, classes and statistics, and the
//! searches over them. Pure functions over decoded data, so they are tested natively.

use std::collections::BTreeMap;

use engine::assets::{AtlasBlock, Manifest};
use engine::atlas::NO_TERM;

/// Neurons listed per search.
pub const SEARCH_RESULTS: usize = 20;

/// A decoded atlas.
#[derive(Debug)]
pub struct Atlas {
    pub manifest: Manifest,
    pub blocks: BTreeMap<usize, AtlasBlock>,
    pub vocabulary: Vec<String>,
    pub classes: Vec<String>,
    /// Unit text embeddings of the vocabulary, `[V, d]`.
    pub vocabulary_embeddings: Vec<f32>,
}

/// One text of a neuron's description with its signed weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub text: String,
    pub weight: f32,
}

/// The atlas's description of one neuron.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronSummary {
    /// Positive terms, largest weight first.
    pub positive: Vec<Term>,
    /// Negative terms, most negative first.
    pub negative: Vec<Term>,
    /// `(class name, <r_n, class embedding>)`, largest magnitude first.
    pub classes: Vec<(String, f32)>,
    pub threshold: f32,
    pub selectivity: f32,
    pub explained: f32,
}

/// One neuron found by a search.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub layer: usize,
    pub neuron: usize,
    /// The matched term and its weight (text search), or the dot product of the neuron's
    /// direction with the query's embedding (direction search).
    pub term: Option<Term>,
    pub score: f32,
}

impl Atlas {
    pub fn embed_dim(&self) -> usize {
        self.manifest.model.embed_dim
    }

    pub fn neuron(&self, layer: usize, neuron: usize) -> Option<NeuronSummary> {
        let block = self.blocks.get(&layer)?;
        if neuron >= block.neurons {
            return None;
        }
        let m = block.m;
        let mut positive = Vec::new();
        let mut negative = Vec::new();
        for slot in neuron * m..(neuron + 1) * m {
            let (index, weight) = (block.terms[slot], block.term_weights[slot]);
            if index == NO_TERM || weight == 0.0 {
                continue;
            }
            let Some(text) = self.vocabulary.get(index as usize) else { continue };
            let term = Term { text: text.clone(), weight };
            if weight > 0.0 {
                positive.push(term);
            } else {
                negative.push(term);
            }
        }
        positive.sort_by(|a, b| b.weight.total_cmp(&a.weight));
        negative.sort_by(|a, b| a.weight.total_cmp(&b.weight));
        let c = block.classes_per_neuron;
        let classes = (neuron * c..(neuron + 1) * c)
            .filter_map(|slot| {
                let name = self.classes.get(block.classes[slot] as usize)?;
                Some((name.clone(), block.class_alignment[slot]))
            })
            .collect();
        Some(NeuronSummary {
            positive,
            negative,
            classes,
            threshold: block.threshold[neuron],
            selectivity: block.selectivity[neuron],
            explained: block.explained[neuron],
        })
    }

    /// Returns the neurons whose description has a term containing the query as a whole word (letter case
    /// ignored), largest weight magnitude first.
    pub fn search_terms(&self, query: &str) -> Vec<Hit> {
        let query = normalize_query(query);
        if query.is_empty() {
            return Vec::new();
        }
        let matching: Vec<bool> =
            self.vocabulary.iter().map(|text| contains_words(&text.to_lowercase(), &query)).collect();
        let mut hits = Vec::new();
        for (&layer, block) in &self.blocks {
            for neuron in 0..block.neurons {
                let best = (neuron * block.m..(neuron + 1) * block.m)
                    .filter(|&slot| {
                        let index = block.terms[slot];
                        index != NO_TERM && matching.get(index as usize).copied().unwrap_or(false)
                    })
                    .max_by(|&a, &b| block.term_weights[a].abs().total_cmp(&block.term_weights[b].abs()));
                if let Some(slot) = best {
                    let weight = block.term_weights[slot];
                    hits.push(Hit {
                        layer,
                        neuron,
                        term: Some(Term { text: self.vocabulary[block.terms[slot] as usize].clone(), weight }),
                        score: weight,
                    });
                }
            }
        }
        hits.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
        hits.truncate(SEARCH_RESULTS);
        hits
    }

    /// Returns the unit embedding of a vocabulary text equal to the query (letter case and surrounding
    /// space ignored), if the vocabulary has one.
    pub fn vocabulary_embedding(&self, query: &str) -> Option<Vec<f32>> {
        let query = normalize_query(query);
        let index = self.vocabulary.iter().position(|text| normalize_query(text) == query)?;
        let d = self.embed_dim();
        self.vocabulary_embeddings.get(index * d..(index + 1) * d).map(<[f32]>::to_vec)
    }

    /// Returns the neurons whose direction has the largest dot product with `embedding` (unit length,
    /// length d), largest first.
    pub fn search_direction(&self, embedding: &[f32]) -> Vec<Hit> {
        let d = self.embed_dim();
        if embedding.len() != d {
            return Vec::new();
        }
        let mut hits = Vec::new();
        for (&layer, block) in &self.blocks {
            for (neuron, direction) in block.direction.chunks_exact(d).enumerate() {
                let score: f32 = direction.iter().zip(embedding).map(|(a, b)| a * b).sum();
                hits.push(Hit { layer, neuron, term: None, score });
            }
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(SEARCH_RESULTS);
        hits
    }
}

/// Lowercases and collapses whitespace.
pub fn normalize_query(query: &str) -> String {
    query.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Returns whether `text` contains `words` (already normalized) as whole words.
fn contains_words(text: &str, words: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric();
    text.match_indices(words).any(|(start, found)| {
        let before = text[..start].chars().next_back();
        let after = text[start + found.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_match() {
        assert!(contains_words("a red dog", "dog"));
        assert!(contains_words("dog", "dog"));
        assert!(contains_words("hot dog stand", "hot dog"));
        assert!(!contains_words("dogma", "dog"));
        assert!(!contains_words("underdog", "dog"));
    }

    #[test]
    fn queries_normalize() {
        assert_eq!(normalize_query("  Hot \n DOG "), "hot dog");
        assert_eq!(normalize_query(""), "");
    }
}

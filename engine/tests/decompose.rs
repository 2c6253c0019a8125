//! Compares the sparse text decomposition with numpy and scikit-learn 1.9.1 on the fixtures of
//! fixtures/omp/ (written by `tools/fixtures_omp.py`): the authors' dictionary of a seeded
//! 3,000 × 64 pool, and `OrthogonalMatchingPursuit(fit_intercept=False)` of 50 targets for m = 8
//! and m = 32. Also checks the pursuit's stopping rules on small hand-made dictionaries.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use engine::decompose::{omp, omp_batch, omp_batch_with, Dictionary, OmpOptions};
use engine::npy::{self, Array};

/// Relative tolerance on OMP coefficients. Both sides compute in f64, but the `.npy` reader
/// returns scikit-learn's f64 coefficients as f32, so the differences seen are up to 6e-8.
const COEFFICIENT_TOLERANCE: f64 = 1e-4;

/// Tolerance on dictionary entries relative to max(|numpy value|, 1): numpy's f64 dictionary is
/// stored in f32 (relative rounding 6e-8), and entries are of order 1 to 10.
const DICTIONARY_TOLERANCE: f64 = 1e-5;

fn fixture(name: &str) -> Array {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/omp")
        .join(name);
    npy::read(&path).unwrap_or_else(|e| {
        panic!("{e} (regenerate with /opt/refenv/bin/python tools/fixtures_omp.py)")
    })
}

fn authors_dictionary() -> Dictionary {
    let embeddings = fixture("embeddings.npy");
    let (texts, dim) = (embeddings.shape[0], embeddings.shape[1]);
    Dictionary::authors(&embeddings.data, texts, dim)
        .expect("authors' dictionary of the fixture pool")
}

/// scikit-learn's decompositions: per target, the atoms in selection order and their coefficients.
fn sklearn_decompositions(m: usize) -> Vec<Vec<(usize, f64)>> {
    let indices = fixture(&format!("indices_m{m}.npy"));
    let coefficients = fixture(&format!("coefficients_m{m}.npy"));
    assert_eq!(
        indices.shape, coefficients.shape,
        "indices_m{m}.npy and coefficients_m{m}.npy"
    );
    assert_eq!(
        indices.shape[1], m,
        "indices_m{m}.npy has {} columns",
        indices.shape[1]
    );
    indices
        .data
        .chunks_exact(m)
        .zip(coefficients.data.chunks_exact(m))
        .map(|(atoms, coefficients)| {
            atoms
                .iter()
                .zip(coefficients)
                .filter(|(&atom, _)| atom >= 0.0)
                .map(|(&atom, &coefficient)| (atom as usize, f64::from(coefficient)))
                .collect()
        })
        .collect()
}

/// Asserts that `actual` selects the same atom set as scikit-learn, in the same order, with
/// coefficients within `COEFFICIENT_TOLERANCE`.
fn assert_matches_sklearn(
    label: &str,
    target: usize,
    actual: &[(usize, f64)],
    expected: &[(usize, f64)],
) {
    let actual_set: BTreeSet<usize> = actual.iter().map(|&(atom, _)| atom).collect();
    let expected_set: BTreeSet<usize> = expected.iter().map(|&(atom, _)| atom).collect();
    assert_eq!(
        actual_set, expected_set,
        "{label}, target {target}: atom sets differ from scikit-learn's"
    );

    let actual_order: Vec<usize> = actual.iter().map(|&(atom, _)| atom).collect();
    let expected_order: Vec<usize> = expected.iter().map(|&(atom, _)| atom).collect();
    assert_eq!(
        actual_order, expected_order,
        "{label}, target {target}: selection order differs"
    );

    for (&(atom, value), &(_, reference)) in actual.iter().zip(expected) {
        let error = (value - reference).abs();
        assert!(
            error <= COEFFICIENT_TOLERANCE * reference.abs(),
            "{label}, target {target}, atom {atom}: coefficient {value}, scikit-learn {reference} \
             (relative error {:.2e})",
            error / reference.abs()
        );
    }
}

#[test]
fn authors_dictionary_matches_numpy() {
    let dictionary = authors_dictionary();
    let expected = fixture("dictionary.npy");
    assert_eq!(
        [dictionary.texts(), dictionary.dim()],
        expected.shape[..],
        "dictionary.npy shape"
    );

    for (index, (&actual, &reference)) in dictionary.atoms().iter().zip(&expected.data).enumerate()
    {
        let reference = f64::from(reference);
        assert!(
            (actual - reference).abs() <= DICTIONARY_TOLERANCE * reference.abs().max(1.0),
            "atom {}, dimension {}: {actual}, numpy {reference}",
            index / dictionary.dim(),
            index % dictionary.dim()
        );
    }
}

#[test]
fn authors_dictionary_columns_have_norm_100() {
    let dictionary = authors_dictionary();
    let dim = dictionary.dim();
    for column in 0..dim {
        let values = dictionary.atoms().iter().skip(column).step_by(dim);
        let norm = values.map(|v| v * v).sum::<f64>().sqrt();
        // Tolerance: f64 rounding over 3,000 squares, far below 1e-9 relative.
        assert!(
            (norm - 100.0).abs() < 1e-9,
            "dimension {column} has norm {norm}"
        );
    }
}

#[test]
fn unit_rows_dictionary_is_centered_with_unit_atoms() {
    let embeddings = fixture("embeddings.npy");
    let (texts, dim) = (embeddings.shape[0], embeddings.shape[1]);
    let dictionary = Dictionary::unit_rows(&embeddings.data, texts, dim).unwrap();
    for atom in 0..texts {
        let norm = dictionary
            .atom(atom)
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        // Tolerance: one f64 division per entry.
        assert!((norm - 1.0).abs() < 1e-12, "atom {atom} has norm {norm}");
    }

    // Each unit atom is the centered embedding divided by its norm, so the centered embeddings
    // (atom times the centered norm) sum to zero over the pool.
    let mut sums = vec![0.0f64; dim];
    for (atom, embedding) in embeddings.data.chunks_exact(dim).enumerate() {
        let mean_free_norm = centered_norm(&embeddings.data, embedding, texts, dim);
        for (sum, value) in sums.iter_mut().zip(dictionary.atom(atom)) {
            *sum += value * mean_free_norm;
        }
    }
    for (column, sum) in sums.iter().enumerate() {
        // Tolerance: f64 rounding over 3,000 terms of order 1.
        assert!(
            sum.abs() < 1e-9,
            "dimension {column}: centered embeddings sum to {sum}"
        );
    }
}

/// Returns the norm of `embedding` minus the pool mean, with the pool scaled by 100 as the
/// dictionaries scale it.
fn centered_norm(pool: &[f32], embedding: &[f32], texts: usize, dim: usize) -> f64 {
    (0..dim)
        .map(|j| {
            let mean = (0..texts)
                .map(|i| f64::from(pool[i * dim + j]) * 100.0)
                .sum::<f64>()
                / texts as f64;
            (f64::from(embedding[j]) * 100.0 - mean).powi(2)
        })
        .sum::<f64>()
        .sqrt()
}

#[test]
fn dictionary_rejects_bad_pools() {
    let error = Dictionary::authors(&[1.0, 0.0, 0.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("3 values do not form a [2, 2] array"),
        "{error}"
    );

    let error = Dictionary::authors(&[1.0, 0.0], 1, 2)
        .unwrap_err()
        .to_string();
    assert!(error.contains("at least 2 texts"), "{error}");

    let error = Dictionary::authors(&[1.0, 0.0, 2.0, 0.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(error.contains("text 1 has norm 2"), "{error}");

    let error = Dictionary::authors(&[1.0, 0.0, f32::NAN, 0.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("text 1 has the non-finite value NaN at dimension 0"),
        "{error}"
    );

    // Both texts have 0 in dimension 1 (the second column), so it cannot be scaled.
    let error = Dictionary::authors(&[1.0, 0.0, -1.0, 0.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("dimension 1 has the same value for all 2 texts"),
        "{error}"
    );

    let error = Dictionary::unit_rows(&[1.0, 0.0, 1.0, 0.0], 2, 2)
        .unwrap_err()
        .to_string();
    assert!(error.contains("text 0 equals the pool mean"), "{error}");
}

#[test]
fn omp_matches_sklearn() {
    let dictionary = authors_dictionary();
    let targets = fixture("targets.npy");
    let dim = dictionary.dim();
    for m in [8, 32] {
        let expected = sklearn_decompositions(m);
        for (t, target) in targets.data.chunks_exact(dim).enumerate() {
            assert_matches_sklearn(
                &format!("omp m = {m}"),
                t,
                &omp(&dictionary, target, m),
                &expected[t],
            );
        }
    }
}

#[test]
fn omp_batch_matches_sklearn() {
    let dictionary = authors_dictionary();
    let targets = fixture("targets.npy");
    let count = targets.shape[0];
    for m in [8, 32] {
        let expected = sklearn_decompositions(m);
        let reported = AtomicUsize::new(0);
        let progress = |done: usize| {
            assert!(
                done >= reported.load(Ordering::SeqCst),
                "progress went backwards to {done}"
            );
            reported.store(done, Ordering::SeqCst);
        };
        let actual = omp_batch(&dictionary, &targets.data, count, m, &progress);
        assert_eq!(
            actual.len(),
            count,
            "omp_batch m = {m}: one decomposition per target"
        );
        assert_eq!(
            reported.load(Ordering::SeqCst),
            count,
            "omp_batch m = {m}: final progress"
        );
        for (t, decomposition) in actual.iter().enumerate() {
            assert_matches_sklearn(
                &format!("omp_batch m = {m}"),
                t,
                decomposition,
                &expected[t],
            );
        }
    }
}

#[test]
fn omp_batch_with_small_cache_matches_sklearn() {
    // Room for 40 Gram columns and all 32 steps from Gram columns: every chunk contains one
    // target, and columns are evicted and recomputed across chunks.
    let dictionary = authors_dictionary();
    let targets = fixture("targets.npy");
    let count = targets.shape[0];
    let options = OmpOptions {
        gram_cache_bytes: 40 * dictionary.texts() * 4,
        gram_steps: Some(32),
    };
    let chunks = AtomicUsize::new(0);
    let progress = |_: usize| {
        chunks.fetch_add(1, Ordering::SeqCst);
    };
    let actual = omp_batch_with(&dictionary, &targets.data, count, 32, &options, &progress);
    assert_eq!(
        chunks.load(Ordering::SeqCst),
        count,
        "one progress call per one-target chunk"
    );
    let expected = sklearn_decompositions(32);
    for (t, decomposition) in actual.iter().enumerate() {
        assert_matches_sklearn("omp_batch small cache", t, decomposition, &expected[t]);
    }
}

#[test]
fn omp_batch_matches_sklearn_for_any_gram_steps() {
    // 0: every step multiplies residuals with the dictionary; 32: every step uses Gram columns.
    let dictionary = authors_dictionary();
    let targets = fixture("targets.npy");
    let count = targets.shape[0];
    let expected = sklearn_decompositions(32);
    for gram_steps in [0, 1, 2, 7, 31, 32] {
        let options = OmpOptions {
            gram_steps: Some(gram_steps),
            ..OmpOptions::default()
        };
        let actual = omp_batch_with(&dictionary, &targets.data, count, 32, &options, &|_| {});
        for (t, decomposition) in actual.iter().enumerate() {
            let label = format!("omp_batch with {gram_steps} Gram steps");
            assert_matches_sklearn(&label, t, decomposition, &expected[t]);
        }
    }
}

/// Returns a 3-dimensional dictionary in which atoms 0 and 2 are equal. Atom 3 is selected first, which
/// swaps columns 0 and 3 in scikit-learn's column array, so on the next step the tie between
/// atoms 0 and 2 goes to atom 2. scikit-learn 1.9.1 returns coef_ [0, 0, 0.5, 0.5] here.
fn tie_dictionary() -> Dictionary {
    let atoms = vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.1, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0];
    Dictionary::from_atoms(atoms, 4, 3).unwrap()
}

#[test]
fn tie_goes_to_first_in_sklearn_order() {
    let dictionary = tie_dictionary();
    let target = [1.0, 0.5, 0.0];
    let expected = vec![(3, 0.5), (2, 0.5)];
    assert_eq!(omp(&dictionary, &target, 2), expected);
    assert_eq!(
        omp_batch(&dictionary, &target, 1, 2, &|_| {}),
        vec![expected]
    );
}

#[test]
fn zero_residual_stops_pursuit() {
    // After atoms 3 and 2 the residual is exactly zero, so the best correlation (zero) is found
    // first at a selected atom, and the pursuit stops with 2 of the 3 requested atoms.
    let dictionary = tie_dictionary();
    let target = [1.0, 0.5, 0.0];
    let expected = vec![(3, 0.5), (2, 0.5)];
    assert_eq!(omp(&dictionary, &target, 3), expected);
    assert_eq!(
        omp_batch(&dictionary, &target, 1, 3, &|_| {}),
        vec![expected]
    );
}

#[test]
fn zero_target_gives_no_atoms() {
    let dictionary = tie_dictionary();
    assert!(omp(&dictionary, &[0.0; 3], 2).is_empty());
    assert_eq!(
        omp_batch(&dictionary, &[0.0; 6], 2, 2, &|_| {}),
        vec![Vec::new(), Vec::new()]
    );
}

#[test]
fn pursuit_stops_when_pool_is_used_up() {
    // m exceeds the 2 atoms: once both are selected, the best correlation belongs to a selected
    // atom although the residual (0, 0, 0.25) is not zero.
    let dictionary = Dictionary::from_atoms(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 2, 3).unwrap();
    let target = [1.0, 0.5, 0.25];
    let expected = vec![(0, 1.0), (1, 0.5)];
    assert_eq!(omp(&dictionary, &target, 5), expected);
    assert_eq!(
        omp_batch(&dictionary, &target, 1, 5, &|_| {}),
        vec![expected]
    );
}

#[test]
fn omp_batch_agrees_with_omp_on_larger_pool() {
    // The fixture pool with m = 60 of its 64 dimensions, so late steps have small correlations
    // and the f32 Gram columns alone would pick a different atom for target 4 at one step.
    let dictionary = authors_dictionary();
    let targets = fixture("targets.npy");
    let dim = dictionary.dim();
    let count = 10;
    let singles: Vec<_> = targets
        .data
        .chunks_exact(dim)
        .take(count)
        .map(|target| omp(&dictionary, target, 60))
        .collect();
    for gram_steps in [None, Some(60)] {
        let options = OmpOptions {
            gram_steps,
            ..OmpOptions::default()
        };
        let batch = omp_batch_with(
            &dictionary,
            &targets.data[..count * dim],
            count,
            60,
            &options,
            &|_| {},
        );
        for (t, single) in singles.iter().enumerate() {
            let label = format!("omp_batch with {gram_steps:?} Gram steps against omp, m = 60");
            assert_matches_sklearn(&label, t, &batch[t], single);
        }
    }
}

#[test]
fn omp_with_zero_atoms_is_empty() {
    let dictionary = tie_dictionary();
    assert!(omp(&dictionary, &[1.0, 0.5, 0.0], 0).is_empty());
    assert_eq!(
        omp_batch(&dictionary, &[1.0, 0.5, 0.0], 1, 0, &|_| {}),
        vec![Vec::new()]
    );
}

#[test]
#[should_panic(expected = "OMP targets: expected 2 × 3 values, found 3")]
fn omp_batch_rejects_short_targets() {
    omp_batch(&tie_dictionary(), &[1.0, 0.5, 0.0], 2, 2, &|_| {});
}

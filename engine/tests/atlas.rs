//! The atlas statistics against a direct computation from the full effects, and sharded runs
//! against a single run, on a seeded tiny random model.

use engine::atlas::partial::Partial;
use engine::atlas::{
    first_direction, significance, BlockMeans, BlockShape, BlockStatistics, MeansState, ScaledCoefficients,
    Shard, StatisticsSource, TopEntry, TopState,
};
use engine::lens::{literal, Lens};
use engine::model::{ClipModel, RecordOptions};
use engine::random::{generate, StorageType};
use engine::weights::{load_clip, Naming};
use engine::{ClipConfig, Device, Tensor, TensorData};
use nalgebra::DMatrix;

const IMAGES: usize = 12;
const K: usize = 4;
const LAYERS: [usize; 2] = [1, 2];

struct Fixture {
    model: ClipModel,
    lens: Lens,
    /// CLIP-normalized pixels of every image, `[3, S, S]` each.
    images: Vec<Vec<f32>>,
    source: StatisticsSource,
}

fn fixture() -> Fixture {
    let config = ClipConfig::preset("tiny").unwrap();
    let generated = generate(&config, 7, Naming::OpenAi, StorageType::F32).unwrap();
    let model = load_clip(&generated.config_json, &generated.safetensors, "tiny", &Device::flex()).unwrap();
    let lens = Lens::new(&model.vision, &LAYERS).unwrap();
    let size = config.vision.image_size;
    let mut rng = engine::random::Rng::new(11);
    let images = (0..IMAGES).map(|_| rng.normal_vec(3 * size * size, 0.0, 1.0)).collect();
    let source = StatisticsSource {
        weights_sha256: engine::assets::sha256_hex(&generated.safetensors),
        images_sha256: "test images".into(),
        images_listed: IMAGES,
        layers: LAYERS.to_vec(),
    };
    Fixture { model, lens, images, source }
}

fn shapes(fixture: &Fixture) -> Vec<BlockShape> {
    BlockShape::of_lens(&fixture.lens).unwrap()
}

/// Forward pass and scaled coefficients of every block for the given images.
fn batch_coefficients(fixture: &Fixture, indices: &[usize]) -> Vec<ScaledCoefficients> {
    let pixels: Vec<f32> = indices.iter().flat_map(|&i| fixture.images[i].iter().copied()).collect();
    let input = fixture.model.vision.input_tensor(pixels, indices.len()).unwrap();
    let output = fixture.model.vision.forward(input, &RecordOptions::lens(&LAYERS));
    let recording = output.recording.as_ref().unwrap();
    shapes(fixture)
        .into_iter()
        .map(|shape| {
            let coefficients = fixture.lens.coefficients(&output.embedding, recording, shape.layer).unwrap();
            pollster::block_on(ScaledCoefficients::read(&coefficients, shape)).unwrap()
        })
        .collect()
}

fn shard_batches(shard: Shard, batch: usize) -> Vec<Vec<usize>> {
    let indices: Vec<usize> = shard.images(IMAGES).collect();
    indices.chunks(batch).map(<[usize]>::to_vec).collect()
}

fn pass_one(fixture: &Fixture, shard: Shard, batch: usize) -> MeansState {
    let mut state = MeansState::new(fixture.source.clone(), shard, &shapes(fixture)).unwrap();
    for indices in shard_batches(shard, batch) {
        state.add(&indices, &batch_coefficients(fixture, &indices)).unwrap();
    }
    state
}

fn pass_two(fixture: &Fixture, shard: Shard, batch: usize, means: Vec<BlockMeans>) -> TopState {
    let mut state = TopState::new(fixture.source.clone(), shard, K, means).unwrap();
    for indices in shard_batches(shard, batch) {
        pollster::block_on(state.add(&fixture.lens, &indices, &batch_coefficients(fixture, &indices))).unwrap();
    }
    state
}

fn finish(fixture: &Fixture, state: &TopState) -> Vec<BlockStatistics> {
    pollster::block_on(state.finish(&fixture.lens, &|_| {})).unwrap()
}

/// Writes a state to its partial file format and reads it back.
fn round_trip(partial: Partial) -> Partial {
    let bytes = partial.encode();
    Partial::decode(&bytes, "test.part").unwrap()
}

/// Runs both passes shard by shard, merging the partial files as separate processes would.
fn sharded(fixture: &Fixture, count: usize, batch: usize) -> (MeansState, TopState) {
    let mut means: Option<Partial> = None;
    for index in 0..count {
        let part = round_trip(Partial::Means(pass_one(fixture, Shard::new(index, count).unwrap(), batch)));
        match &mut means {
            None => means = Some(part),
            Some(merged) => merged.merge(part).unwrap(),
        }
    }
    let Some(Partial::Means(means)) = means else { panic!("a means state") };
    let block_means = means.means().unwrap();

    let mut top: Option<Partial> = None;
    for index in 0..count {
        let state = pass_two(fixture, Shard::new(index, count).unwrap(), batch, block_means.clone());
        let part = round_trip(Partial::Top(state));
        match &mut top {
            None => top = Some(part),
            Some(merged) => merged.merge(part).unwrap(),
        }
    }
    let Some(Partial::Top(top)) = top else { panic!("a top state") };
    (means, top)
}

/// Computes the effects of every image, `[image][neuron][d]`, with the literal f64 oracle.
fn reference_effects(fixture: &Fixture, layer: usize) -> Vec<Vec<Vec<f64>>> {
    let pixels: Vec<f32> = fixture.images.iter().flatten().copied().collect();
    let input = fixture.model.vision.input_tensor(pixels, IMAGES).unwrap();
    let output = fixture.model.vision.forward(input, &RecordOptions::lens(&LAYERS));
    literal::effects(&fixture.model.vision, &output.embedding, output.recording.as_ref().unwrap(), layer)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn max_abs(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Largest |a - b| over the largest |b|.
fn relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = max_abs(expected.iter().map(|&v| f64::from(v)));
    let worst = max_abs(actual.iter().zip(expected).map(|(&a, &e)| f64::from(a) - f64::from(e)));
    if scale == 0.0 { worst } else { worst / scale }
}

#[test]
fn statistics_match_direct_computation() {
    // Tolerances: 1e-4 relative for means, norms, thresholds and selectivity (f32 factorized vs
    // the f64 literal effects); directions |cos| > 1 - 1e-5 wherever the first two singular
    // values differ by more than 1e-3 relative; explained shares 1e-4 absolute.
    let fixture = fixture();
    let means = pass_one(&fixture, Shard::WHOLE, 5);
    let block_means = means.means().unwrap();
    let top = pass_two(&fixture, Shard::WHOLE, 5, block_means.clone());
    let statistics = finish(&fixture, &top);
    let d = fixture.model.config.embed_dim;
    let mut checked_directions = 0;

    for (stats, block_mean) in statistics.iter().zip(&block_means) {
        let layer = stats.shape.layer;
        let neurons = stats.shape.neurons;
        let effects = reference_effects(&fixture, layer);

        // The mean effect b_n from the means of the scaled coefficients and of the shared vector.
        let (mean_c, mean_s) = block_mean.to_device(&Device::flex());
        let mean_effect = fixture
            .lens
            .effects(&engine::lens::BlockCoefficients {
                layer,
                c: mean_c.unsqueeze::<3>(),
                scale: Tensor::ones([1, 1], &Device::flex()),
                shared: mean_s.unsqueeze::<2>(),
            })
            .unwrap();
        let mean_effect: Vec<f32> = mean_effect.into_data().convert::<f32>().try_to_vec().unwrap();
        let expected_mean: Vec<f32> = (0..neurons * d)
            .map(|i| (effects.iter().map(|image| image[i / d][i % d]).sum::<f64>() / IMAGES as f64) as f32)
            .collect();
        let error = relative_error(&mean_effect, &expected_mean);
        assert!(error < 1e-4, "block {layer}: mean effect relative error {error:e}");

        for n in 0..neurons {
            let centered: Vec<Vec<f64>> = effects
                .iter()
                .map(|image| image[n].iter().zip(&expected_mean[n * d..(n + 1) * d]).map(|(e, m)| e - f64::from(*m)).collect())
                .collect();
            let norms: Vec<f64> = centered.iter().map(|c| norm(c)).collect();
            let mut order: Vec<usize> = (0..IMAGES).collect();
            order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
            let scale = norms[order[0]];

            let top_images = &stats.top_images[n * K..(n + 1) * K];
            let top_norms = &stats.top_norms[n * K..(n + 1) * K];
            for i in 0..K {
                let (ours, theirs) = (top_images[i] as usize, order[i]);
                // A different image is acceptable only where the two norms tie within tolerance.
                assert!(
                    (norms[ours] - norms[theirs]).abs() <= 1e-4 * scale,
                    "block {layer} neuron {n} rank {i}: image {ours} (norm {}) instead of {theirs} (norm {})",
                    norms[ours],
                    norms[theirs]
                );
                let error = (f64::from(top_norms[i]) - norms[ours]).abs() / scale;
                assert!(error < 1e-4, "block {layer} neuron {n} rank {i}: norm relative error {error:e}");
            }
            let threshold_error = (f64::from(stats.threshold[n]) - norms[order[K - 1]]).abs() / scale;
            assert!(threshold_error < 1e-4, "block {layer} neuron {n}: threshold relative error {threshold_error:e}");

            let top_mean = order[..K].iter().map(|&i| norms[i]).sum::<f64>() / K as f64;
            let all_mean = norms.iter().sum::<f64>() / IMAGES as f64;
            let selectivity = top_mean / all_mean;
            let error = (f64::from(stats.selectivity[n]) - selectivity).abs() / selectivity;
            assert!(error < 1e-4, "block {layer} neuron {n}: selectivity {} vs {selectivity}", stats.selectivity[n]);

            // The SVD of the k x d matrix of top centered effects, directly.
            let rows: Vec<&Vec<f64>> = top_images.iter().map(|&i| &centered[i as usize]).collect();
            let x = DMatrix::from_fn(K, d, |i, j| rows[i][j]);
            let svd = x.clone().svd(false, true);
            let mut singular: Vec<(f64, usize)> = svd.singular_values.iter().copied().zip(0..).collect();
            singular.sort_by(|a, b| b.0.total_cmp(&a.0));
            let v_t = svd.v_t.as_ref().unwrap();
            let first = v_t.row(singular[0].1);
            let total: f64 = singular.iter().map(|(s, _)| s * s).sum();
            let explained = singular[0].0.powi(2) / total;
            let error = (f64::from(stats.explained[n]) - explained).abs();
            assert!(error < 1e-4, "block {layer} neuron {n}: explained {} vs {explained}", stats.explained[n]);

            let ours = &stats.direction[n * d..(n + 1) * d];
            let ours_norm = ours.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            assert!((ours_norm - 1.0).abs() < 1e-5, "block {layer} neuron {n}: direction norm {ours_norm}");
            if (singular[0].0 - singular[1].0) / singular[0].0 > 1e-3 {
                let cos: f64 = ours.iter().zip(first.iter()).map(|(&a, b)| f64::from(a) * b).sum();
                assert!(cos.abs() > 1.0 - 1e-5, "block {layer} neuron {n}: |cos| {}", cos.abs());
                checked_directions += 1;
            }
            // Sign: more than half of the top effects point along the direction (or, at exactly
            // half, their dot products sum to a positive value).
            let dots: Vec<f64> =
                rows.iter().map(|row| row.iter().zip(ours).map(|(a, &b)| a * f64::from(b)).sum()).collect();
            let positive = dots.iter().filter(|&&v| v > 0.0).count();
            assert!(
                2 * positive > K || (2 * positive == K && dots.iter().sum::<f64>() > 0.0),
                "block {layer} neuron {n}: {positive} of {K} top effects have a positive dot product"
            );
        }
    }
    // Nearly all neurons have a clear gap between the first two singular values.
    let neurons = statistics.iter().map(|s| s.shape.neurons).sum::<usize>();
    assert!(checked_directions * 10 >= neurons * 9, "only {checked_directions} of {neurons} directions checked");
}

fn assert_statistics_close(single: &[BlockStatistics], merged: &[BlockStatistics], what: &str) {
    // Tolerance: 1e-6 relative to each array's largest entry; the only differences come from the
    // order of f64 sums and from batching the forward pass differently.
    assert_eq!(single.len(), merged.len());
    for (a, b) in single.iter().zip(merged) {
        let layer = a.shape.layer;
        assert_eq!(a.shape, b.shape);
        assert_eq!(a.top_images, b.top_images, "{what}: block {layer} top images");
        for (name, x, y) in [
            ("mean_coefficients", &a.mean_coefficients, &b.mean_coefficients),
            ("mean_shared", &a.mean_shared, &b.mean_shared),
            ("threshold", &a.threshold, &b.threshold),
            ("direction", &a.direction, &b.direction),
            ("explained", &a.explained, &b.explained),
            ("selectivity", &a.selectivity, &b.selectivity),
            ("top_norms", &a.top_norms, &b.top_norms),
        ] {
            let error = relative_error(y, x);
            assert!(error < 1e-6, "{what}: block {layer} {name} relative error {error:e}");
        }
    }
}

#[test]
fn merged_shards_match_single_run() {
    // Tolerance: see assert_statistics_close (1e-6 relative).
    let fixture = fixture();
    let single_means = pass_one(&fixture, Shard::WHOLE, 4);
    let single_top = pass_two(&fixture, Shard::WHOLE, 4, single_means.means().unwrap());
    let single = finish(&fixture, &single_top);

    for count in [2, 3] {
        let (means, top) = sharded(&fixture, count, 3);
        assert!(means.coverage.is_complete());
        assert_eq!(means.coverage.images, IMAGES as u64);
        for (a, b) in single_means.blocks.iter().zip(&means.blocks) {
            let scale = max_abs(a.coefficients.iter().copied());
            let error = max_abs(a.coefficients.iter().zip(&b.coefficients).map(|(x, y)| x - y)) / scale;
            assert!(error < 1e-6, "{count} shards: block {} coefficient sums relative error {error:e}", a.shape.layer);
        }
        let merged = finish(&fixture, &top);
        assert_statistics_close(&single, &merged, &format!("{count} shards"));
    }
}

#[test]
fn partial_round_trip_preserves_state() {
    let fixture = fixture();
    let means = pass_one(&fixture, Shard::new(1, 2).unwrap(), 4);
    let Partial::Means(decoded) = round_trip(Partial::Means(means.clone())) else { panic!("a means state") };
    assert_eq!(decoded, means);

    let whole = pass_one(&fixture, Shard::WHOLE, 6);
    let top = pass_two(&fixture, Shard::new(0, 2).unwrap(), 4, whole.means().unwrap());
    let Partial::Top(decoded) = round_trip(Partial::Top(top.clone())) else { panic!("a top state") };
    assert_eq!(decoded.coverage, top.coverage);
    assert_eq!(decoded.means, top.means);
    for (a, b) in top.blocks.iter().zip(&decoded.blocks) {
        assert_eq!(a.norm_sums, b.norm_sums);
        for n in 0..a.shape.neurons {
            assert_eq!(a.entries(n), b.entries(n), "block {} neuron {n}", a.shape.layer);
        }
    }
}

#[test]
fn merge_rejects_mismatched_states() {
    let fixture = fixture();
    let shapes = shapes(&fixture);
    let first = MeansState::new(fixture.source.clone(), Shard::new(0, 2).unwrap(), &shapes).unwrap();

    let mut twice = first.clone();
    let error = twice.merge(first.clone()).unwrap_err().to_string();
    assert!(error.contains("shard 0/2 is in both states"), "{error}");

    let mut other_source = fixture.source.clone();
    other_source.weights_sha256 = "other".into();
    let other = MeansState::new(other_source, Shard::new(1, 2).unwrap(), &shapes).unwrap();
    let error = first.clone().merge(other).unwrap_err().to_string();
    assert!(error.contains("different model weights"), "{error}");

    let other_count = MeansState::new(fixture.source.clone(), Shard::new(1, 3).unwrap(), &shapes).unwrap();
    let error = first.clone().merge(other_count).unwrap_err().to_string();
    assert!(error.contains("2 shards with one of 3 shards"), "{error}");

    let error = first.means().unwrap_err().to_string();
    assert!(error.contains("shards 1/2 are missing"), "{error}");
}

#[test]
fn partial_decode_rejects_damaged_files() {
    let fixture = fixture();
    let state = MeansState::new(fixture.source.clone(), Shard::WHOLE, &shapes(&fixture)).unwrap();
    let bytes = Partial::Means(state).encode();

    let error = Partial::decode(b"not a partial file at all", "a.part").unwrap_err().to_string();
    assert!(error.contains("a.part"), "{error}");
    assert!(error.contains("CLATPART"), "{error}");
    let error = Partial::decode(&bytes[..bytes.len() - 3], "b.part").unwrap_err().to_string();
    assert!(error.contains("b.part"), "{error}");
    assert!(error.contains("runs past the end"), "{error}");
    let mut newer = bytes.clone();
    newer[8] = 9;
    let error = Partial::decode(&newer, "c.part").unwrap_err().to_string();
    assert!(error.contains("version 9"), "{error}");
}

#[test]
fn shard_parse_and_membership() {
    assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
    assert_eq!(Shard::parse("1/3").unwrap().images(8).collect::<Vec<_>>(), vec![1, 4, 7]);
    assert!(Shard::parse("3/3").is_err());
    assert!(Shard::parse("0/0").is_err());
    assert!(Shard::parse("1").is_err());
    assert!(Shard::parse("a/2").is_err());
    assert_eq!(Shard::WHOLE.to_string(), "0/1");
}

#[test]
fn significance_matches_centered_norms() {
    // Tolerance: 1e-4 relative to the largest centered norm (f32 Gram form vs f64 literal).
    let fixture = fixture();
    let means = pass_one(&fixture, Shard::WHOLE, 12).means().unwrap();
    let layer = LAYERS[1];
    let block_means = &means[1];
    let d = fixture.model.config.embed_dim;
    let effects = reference_effects(&fixture, layer);
    let neurons = block_means.shape.neurons;
    let mean: Vec<Vec<f64>> = (0..neurons)
        .map(|n| (0..d).map(|j| effects.iter().map(|e| e[n][j]).sum::<f64>() / IMAGES as f64).collect())
        .collect();

    let pixels: Vec<f32> = fixture.images[..3].iter().flatten().copied().collect();
    let input = fixture.model.vision.input_tensor(pixels, 3).unwrap();
    let output = fixture.model.vision.forward(input, &RecordOptions::lens(&LAYERS));
    let coefficients = fixture.lens.coefficients(&output.embedding, output.recording.as_ref().unwrap(), layer).unwrap();
    // A threshold of the norm of image 0 makes neuron n significant on the other images exactly
    // when their norm is larger.
    let expected: Vec<Vec<f64>> = (0..3)
        .map(|b| (0..neurons).map(|n| norm(&effects[b][n].iter().zip(&mean[n]).map(|(e, m)| e - m).collect::<Vec<_>>())).collect())
        .collect();
    let threshold: Vec<f32> = expected[0].iter().map(|&v| v as f32).collect();
    let result = pollster::block_on(significance(&fixture.lens, &coefficients, block_means, &threshold)).unwrap();
    assert_eq!(result.len(), 3);
    let scale = max_abs(expected.iter().flatten().copied());
    for (b, image) in result.iter().enumerate() {
        for n in 0..neurons {
            let error = (f64::from(image.norms[n]) - expected[b][n]).abs() / scale;
            assert!(error < 1e-4, "image {b} neuron {n}: norm relative error {error:e}");
            if (expected[b][n] - expected[0][n]).abs() > 1e-4 * scale {
                assert_eq!(image.significant[n], expected[b][n] > expected[0][n], "image {b} neuron {n}");
            }
        }
    }

    let error = pollster::block_on(significance(&fixture.lens, &coefficients, &means[0], &threshold)).unwrap_err();
    assert!(error.to_string().contains("block 1"), "{error}");
}

#[test]
fn first_direction_sign_and_zero() {
    // Three rows along +e0 and one along -e0: the direction is +e0 whatever sign the eigen
    // solver returns. Tolerance 1e-12 (exact arithmetic on small integers).
    let (k, d) = (4, 3);
    let x: Vec<f32> = vec![1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0];
    let gram: Vec<f32> = (0..k * k)
        .map(|ij| (0..d).map(|j| x[(ij / k) * d + j] * x[(ij % k) * d + j]).sum())
        .collect();
    let direction = first_direction(&x, &gram, k, d);
    assert_eq!(direction.vector, vec![1.0, 0.0, 0.0]);
    assert!((direction.explained - 1.0).abs() < 1e-12);

    // Two rows each way: the sum of the dot products decides (2 + 1 - 1 - 1 > 0).
    let x: Vec<f32> = vec![-1.0, 0.0, 2.0, 0.0, -1.0, 0.0, 1.0, 0.0];
    let gram: Vec<f32> = (0..16).map(|ij| x[(ij / 4) * 2] * x[(ij % 4) * 2]).collect();
    let direction = first_direction(&x, &gram, 4, 2);
    assert_eq!(direction.vector, vec![1.0, 0.0]);

    let zero = first_direction(&[0.0; 6], &[0.0; 4], 2, 3);
    assert_eq!(zero.vector, vec![0.0; 3]);
    assert_eq!(zero.explained, 0.0);
}

#[test]
fn top_entries_rank_by_norm_then_index() {
    let a = TopEntry { norm: 2.0, image: 5 };
    let b = TopEntry { norm: 2.0, image: 3 };
    let c = TopEntry { norm: 3.0, image: 9 };
    let mut entries = vec![a, b, c];
    entries.sort_by(TopEntry::rank);
    assert_eq!(entries, vec![c, b, a]);
}

#[test]
fn class_alignment_keeps_largest_magnitudes() {
    // Tolerance 1e-6 absolute (f32 dot products of unit vectors).
    let d = 3;
    let classes: Vec<f32> = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.0];
    let classes = Tensor::<2>::from_data(TensorData::new(classes, [4, d]), &Device::flex());
    let directions = vec![0.0, -1.0, 0.0, 0.6, 0.0, 0.8];
    let (indices, values, keep) =
        pollster::block_on(engine::atlas::class_alignment(&directions, &classes)).unwrap();
    assert_eq!(keep, 4);
    assert_eq!(&indices[..4], &[1, 3, 0, 2]);
    for (v, e) in values[..4].iter().zip([-1.0, -0.8, 0.0, 0.0]) {
        assert!((v - e).abs() < 1e-6, "{v} vs {e}");
    }
    assert_eq!(&indices[4..], &[2, 0, 3, 1]);
    for (v, e) in values[4..].iter().zip([0.8, 0.6, 0.36, 0.0]) {
        assert!((v - e).abs() < 1e-6, "{v} vs {e}");
    }
}

#[test]
fn term_arrays_pad_short_pursuits() {
    let (terms, weights) = engine::atlas::term_arrays(&[vec![(4, 0.5), (2, -1.0)], vec![]], 3).unwrap();
    assert_eq!(terms, vec![4, 2, engine::atlas::NO_TERM, engine::atlas::NO_TERM, engine::atlas::NO_TERM, engine::atlas::NO_TERM]);
    assert_eq!(weights, vec![0.5, -1.0, 0.0, 0.0, 0.0, 0.0]);
    assert!(engine::atlas::term_arrays(&[vec![(0, 1.0); 4]], 3).is_err());
}

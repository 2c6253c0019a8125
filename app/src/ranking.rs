//! Pure helpers over the engine's per-image numbers: the top neurons of a block, a neuron's
//! post-activations over the patch grid, and number formatting.

/// Returns the `count` neurons with the largest values as `(index, value)`, largest first.
/// NaN values are skipped, so a numerical failure in one neuron cannot push others out.
pub fn top_neurons(values: &[f32], count: usize) -> Vec<(usize, f32)> {
    let mut ranked: Vec<(usize, f32)> =
        values.iter().copied().enumerate().filter(|(_, value)| !value.is_nan()).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(count);
    ranked
}

/// Returns the 1-based rank of neuron `index` among `values` (1 is the largest), or `None` when
/// the index is out of range or its value is NaN.
pub fn rank_of(values: &[f32], index: usize) -> Option<usize> {
    let value = *values.get(index)?;
    if value.is_nan() {
        return None;
    }
    Some(1 + values.iter().filter(|other| **other > value).count())
}

/// Post-activations of one neuron, split into the class token and the patch grid.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronMap {
    pub class_token: f32,
    /// `grid * grid` values, patches row-major.
    pub patches: Vec<f32>,
    pub grid: usize,
}

/// Extracts neuron `index` from `mlp_post`, a row-major `[tokens, neurons]` matrix whose token 0
/// is the class token and whose other tokens are the `grid x grid` patches row-major.
/// Returns `None` when the shapes disagree or the index is out of range.
pub fn neuron_map(
    mlp_post: &[f32],
    tokens: usize,
    neurons: usize,
    grid: usize,
    index: usize,
) -> Option<NeuronMap> {
    if index >= neurons || tokens != grid * grid + 1 || mlp_post.len() != tokens * neurons {
        return None;
    }
    let column = |token: usize| mlp_post[token * neurons + index];
    Some(NeuronMap {
        class_token: column(0),
        patches: (1..tokens).map(column).collect(),
        grid,
    })
}

/// Returns the smallest and largest finite value of all slices, or `None` if there is none.
pub fn finite_range<'a>(slices: impl IntoIterator<Item = &'a [f32]>) -> Option<(f32, f32)> {
    let mut range: Option<(f32, f32)> = None;
    for value in slices.into_iter().flatten().copied().filter(|value| value.is_finite()) {
        range = Some(match range {
            None => (value, value),
            Some((low, high)) => (low.min(value), high.max(value)),
        });
    }
    range
}

/// Formats a value with three significant digits, switching to scientific notation outside
/// 0.001..10000 so that bars of very different models stay readable.
pub fn format_value(value: f32) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let magnitude = value.abs();
    if magnitude == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e4).contains(&magnitude) {
        format!("{value:.2e}")
    } else {
        let decimals = (2 - magnitude.log10().floor() as i32).max(0) as usize;
        format!("{value:.decimals$}")
    }
}

/// Formats a byte count in binary megabytes with one decimal.
pub fn format_megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_neurons_sorted_and_truncated() {
        let values = [0.5, 2.0, f32::NAN, 1.0, 2.0, -1.0];
        assert_eq!(top_neurons(&values, 3), vec![(1, 2.0), (4, 2.0), (3, 1.0)]);
        assert_eq!(top_neurons(&values, 100).len(), 5);
        assert!(top_neurons(&[], 20).is_empty());
    }

    #[test]
    fn rank_counts_larger_values() {
        let values = [0.5, 2.0, 1.0, 2.0];
        assert_eq!(rank_of(&values, 1), Some(1));
        assert_eq!(rank_of(&values, 3), Some(1));
        assert_eq!(rank_of(&values, 2), Some(3));
        assert_eq!(rank_of(&values, 0), Some(4));
        assert_eq!(rank_of(&values, 4), None);
        assert_eq!(rank_of(&[f32::NAN], 0), None);
    }

    #[test]
    fn neuron_map_reads_one_column() {
        // 2 x 2 grid plus the class token, 3 neurons: value = 10 * token + neuron.
        let (grid, neurons) = (2, 3);
        let tokens = grid * grid + 1;
        let mlp_post: Vec<f32> =
            (0..tokens).flat_map(|t| (0..neurons).map(move |n| (10 * t + n) as f32)).collect();

        let map = neuron_map(&mlp_post, tokens, neurons, grid, 2).unwrap();
        assert_eq!(map.class_token, 2.0);
        assert_eq!(map.patches, vec![12.0, 22.0, 32.0, 42.0]);
        assert_eq!(map.grid, 2);
    }

    #[test]
    fn neuron_map_rejects_bad_shapes() {
        let mlp_post = vec![0.0; 15];
        assert!(neuron_map(&mlp_post, 5, 3, 2, 3).is_none(), "index out of range");
        assert!(neuron_map(&mlp_post, 5, 3, 3, 0).is_none(), "grid disagrees with tokens");
        assert!(neuron_map(&mlp_post[..14], 5, 3, 2, 0).is_none(), "short buffer");
    }

    #[test]
    fn finite_range_skips_nan_and_infinity() {
        let a = [1.0, f32::NAN, -2.0];
        let b = [f32::INFINITY, 5.0];
        assert_eq!(finite_range([&a[..], &b[..]]), Some((-2.0, 5.0)));
        assert_eq!(finite_range([&[f32::NAN][..]]), None);
    }

    #[test]
    fn values_format_with_three_digits() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(1.23456), "1.23");
        assert_eq!(format_value(12.3456), "12.3");
        assert_eq!(format_value(123.456), "123");
        assert_eq!(format_value(0.012345), "0.0123");
        assert_eq!(format_value(-0.5), "-0.500");
        assert_eq!(format_value(123456.0), "1.23e5");
        assert_eq!(format_value(0.00001234), "1.23e-5");
    }

    #[test]
    fn megabytes_format() {
        assert_eq!(format_megabytes(0), "0.0 MB");
        assert_eq!(format_megabytes(3 * 1024 * 1024 / 2), "1.5 MB");
    }
}

//! The color scale of the neuron heatmaps and the blending of a patch grid over an image.

/// Anchors of the color scale from low to high post-activation: dark blue, violet, red-orange,
/// pale yellow. Luminance rises monotonically along it, so the order survives grayscale printing.
const ANCHORS: [[f32; 3]; 5] = [
    [13.0, 8.0, 135.0],
    [126.0, 3.0, 168.0],
    [204.0, 71.0, 120.0],
    [248.0, 149.0, 64.0],
    [240.0, 249.0, 33.0],
];

/// Opacity of the heatmap over the image, between 0 (image only) and 1 (heatmap only).
pub const OVERLAY_ALPHA: f32 = 0.6;

/// Returns the color of `t` in 0..=1 (values outside are clamped, NaN maps to the low end).
pub fn color(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let position = t * (ANCHORS.len() - 1) as f32;
    let lower = (position.floor() as usize).min(ANCHORS.len() - 2);
    let fraction = position - lower as f32;
    let (from, to) = (ANCHORS[lower], ANCHORS[lower + 1]);
    std::array::from_fn(|channel| {
        (from[channel] + (to[channel] - from[channel]) * fraction).round() as u8
    })
}

/// Maps `value` into 0..=1 over `low..=high`; a range of zero width maps everything to 0.5.
pub fn normalize(value: f32, low: f32, high: f32) -> f32 {
    if high > low {
        (value - low) / (high - low)
    } else {
        0.5
    }
}

/// Returns a CSS `linear-gradient` that shows the color scale from left (low) to right (high).
pub fn css_gradient() -> String {
    let stops: Vec<String> = (0..=10)
        .map(|step| {
            let t = step as f32 / 10.0;
            let [r, g, b] = color(t);
            format!("rgb({r}, {g}, {b}) {}%", step * 10)
        })
        .collect();
    format!("linear-gradient(to right, {})", stops.join(", "))
}

/// Converts an RGB8 image to the RGBA8 layout of `ImageData`.
pub fn rgb_to_rgba(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3).flat_map(|pixel| [pixel[0], pixel[1], pixel[2], 255]).collect()
}

/// Blends a `grid x grid` map (row-major) over an RGB8 image of `width x height` and returns
/// RGBA8 pixels. Each patch is one flat block of color (no interpolation), because that is the
/// resolution of the model's input grid. `low..=high` is the value range of the scale.
pub fn blend_over(
    rgb: &[u8],
    width: usize,
    height: usize,
    map: &[f32],
    grid: usize,
    low: f32,
    high: f32,
) -> Vec<u8> {
    let mut rgba = Vec::with_capacity(width * height * 4);
    for y in 0..height {
        let row = (y * grid / height.max(1)).min(grid.saturating_sub(1));
        for x in 0..width {
            let column = (x * grid / width.max(1)).min(grid.saturating_sub(1));
            let value = map.get(row * grid + column).copied().unwrap_or(f32::NAN);
            let overlay = color(normalize(value, low, high));
            let offset = (y * width + x) * 3;
            for channel in 0..3 {
                let base = rgb.get(offset + channel).copied().unwrap_or(0) as f32;
                let mixed = base * (1.0 - OVERLAY_ALPHA) + overlay[channel] as f32 * OVERLAY_ALPHA;
                rgba.push(mixed.round() as u8);
            }
            rgba.push(255);
        }
    }
    rgba
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn color_ends_match_anchors() {
        assert_eq!(color(0.0), [13, 8, 135]);
        assert_eq!(color(1.0), [240, 249, 33]);
        assert_eq!(color(-3.0), color(0.0));
        assert_eq!(color(7.0), color(1.0));
        assert_eq!(color(f32::NAN), color(0.0));
    }

    #[test]
    fn color_brightness_rises() {
        let luminance = |[r, g, b]: [u8; 3]| 0.2126 * r as f32 + 0.7152 * g as f32 + 0.0722 * b as f32;
        let samples: Vec<f32> = (0..=20).map(|step| luminance(color(step as f32 / 20.0))).collect();
        for pair in samples.windows(2) {
            assert!(pair[1] > pair[0], "luminance falls between samples: {pair:?}");
        }
    }

    #[test]
    fn normalize_handles_flat_range() {
        assert_eq!(normalize(2.0, 1.0, 3.0), 0.5);
        assert_eq!(normalize(3.0, 1.0, 3.0), 1.0);
        assert_eq!(normalize(5.0, 2.0, 2.0), 0.5);
    }

    #[test]
    fn blend_colors_each_patch_block() {
        // A 4 x 4 black image under a 2 x 2 map: the top-left patch is low, the bottom-right high.
        let rgb = vec![0u8; 4 * 4 * 3];
        let rgba = blend_over(&rgb, 4, 4, &[0.0, 0.5, 0.5, 1.0], 2, 0.0, 1.0);
        assert_eq!(rgba.len(), 4 * 4 * 4);

        let pixel = |x: usize, y: usize| &rgba[(y * 4 + x) * 4..(y * 4 + x) * 4 + 4];
        let expected = |t: f32| {
            let [r, g, b] = color(t);
            let scale = |c: u8| (c as f32 * OVERLAY_ALPHA).round() as u8;
            [scale(r), scale(g), scale(b), 255]
        };
        assert_eq!(pixel(0, 0), expected(0.0));
        assert_eq!(pixel(1, 1), expected(0.0));
        assert_eq!(pixel(3, 3), expected(1.0));
        assert_eq!(pixel(2, 0), expected(0.5));
    }

    #[test]
    fn rgba_conversion_adds_opaque_alpha() {
        assert_eq!(rgb_to_rgba(&[1, 2, 3, 4, 5, 6]), vec![1, 2, 3, 255, 4, 5, 6, 255]);
    }
}

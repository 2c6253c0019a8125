//! A canvas that shows RGBA8 pixels computed in Rust.

use leptos::html::Canvas;
use leptos::prelude::*;
use wasm_bindgen::{Clamped, JsCast};
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement, ImageData};

/// Draws `rgba` (`width * height * 4` bytes) into a canvas of that size. CSS scales it.
#[component]
pub fn PixelCanvas(
    rgba: Vec<u8>,
    width: u32,
    height: u32,
    /// Text alternative for screen readers.
    #[prop(into)]
    label: String,
    #[prop(into, optional)] class: String,
) -> impl IntoView {
    let canvas = NodeRef::<Canvas>::new();
    Effect::new(move |_| {
        if let Some(element) = canvas.get() {
            if let Err(reason) = draw(&element, &rgba, width, height) {
                log::error!("drawing a {width}x{height} canvas failed: {reason}");
            }
        }
    });
    view! {
        <canvas node_ref=canvas class=class width=width height=height role="img" aria-label=label></canvas>
    }
}

fn draw(canvas: &HtmlCanvasElement, rgba: &[u8], width: u32, height: u32) -> Result<(), String> {
    if rgba.len() != width as usize * height as usize * 4 {
        return Err(format!("{} bytes do not make {width}x{height} RGBA pixels", rgba.len()));
    }
    let context: CanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(|err| crate::fetch::describe_js(&err))?
        .ok_or("the canvas has no 2d context")?
        .dyn_into()
        .map_err(|_| "the 2d context has an unexpected type")?;
    let image = ImageData::new_with_u8_clamped_array_and_sh(Clamped(rgba), width, height)
        .map_err(|err| crate::fetch::describe_js(&err))?;
    context.put_image_data(&image, 0.0, 0.0).map_err(|err| crate::fetch::describe_js(&err))
}

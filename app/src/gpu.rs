//! Compute device selection: WebGPU in the browser, checked by a small matrix product that is
//! read back before the page reports the backend.

use engine::{Device, Tensor, TensorData};

/// The device the engine runs on, with the label the page shows for it.
#[derive(Clone)]
pub struct Backend {
    pub device: Device,
    pub kind: BackendKind,
    /// Human-readable name, such as "WebGPU (SwiftShader Device)".
    pub label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    WebGpu,
    /// burn's pure-Rust flex backend on the page's own thread.
    Cpu,
}

impl BackendKind {
    /// Value of `<body data-backend>`, which the browser tests read.
    pub fn attribute(self) -> &'static str {
        match self {
            BackendKind::WebGpu => "webgpu",
            BackendKind::Cpu => "cpu",
        }
    }
}

/// Returns whether `navigator.gpu` exists, that is, whether the browser exposes WebGPU at all.
pub fn browser_has_webgpu() -> bool {
    let Some(window) = web_sys::window() else {
        return false;
    };
    js_sys::Reflect::get(&window.navigator(), &"gpu".into())
        .map(|gpu| !gpu.is_undefined() && !gpu.is_null())
        .unwrap_or(false)
}

/// Requests a WebGPU adapter and device, then runs and reads back a matrix product on it.
#[cfg(target_arch = "wasm32")]
pub async fn init_webgpu() -> Result<Backend, String> {
    if !browser_has_webgpu() {
        return Err("this browser does not expose WebGPU (navigator.gpu is missing)".into());
    }
    // Asking the browser first turns "no adapter" into an error message instead of a failure
    // inside the wgpu runtime, and gives the label details that wgpu's adapter info leaves empty.
    let description = probe_browser_adapter().await?;
    let (device, setup) = Device::wgpu_options()
        .init_with_setup_async()
        .await
        .map_err(|err| format!("WebGPU initialization failed: {err}"))?;

    let info = setup.adapter.get_info();
    log::info!("WebGPU adapter as wgpu reports it: {info:?}");
    let adapter = match description {
        Some(description) => description,
        None if !info.name.is_empty() => info.name.clone(),
        None => "adapter details hidden by the browser".to_string(),
    };

    check_matmul(&device).await?;
    Ok(Backend { device, kind: BackendKind::WebGpu, label: format!("WebGPU ({adapter})") })
}

/// Calls `navigator.gpu.requestAdapter()` and fails when the browser has no adapter to offer.
/// Describes the adapter from its `GPUAdapterInfo` (vendor, architecture, description, and
/// whether it is a software fallback), or returns `None` if the browser hides all of them.
#[cfg(target_arch = "wasm32")]
async fn probe_browser_adapter() -> Result<Option<String>, String> {
    use js_sys::{Function, Promise, Reflect};
    use wasm_bindgen::{JsCast, JsValue};

    let failed = |err: JsValue| format!("requesting a WebGPU adapter failed: {}", crate::fetch::describe_js(&err));
    let window = web_sys::window().ok_or("no browser window")?;
    let gpu = Reflect::get(&window.navigator(), &"gpu".into()).map_err(failed)?;
    let request: Function = Reflect::get(&gpu, &"requestAdapter".into())
        .map_err(failed)?
        .dyn_into()
        .map_err(|_| "navigator.gpu.requestAdapter is not a function")?;
    let promise: Promise = request
        .call0(&gpu)
        .map_err(failed)?
        .dyn_into()
        .map_err(|_| "navigator.gpu.requestAdapter() returned no promise")?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise).await.map_err(failed)?;
    if adapter.is_null() || adapter.is_undefined() {
        return Err("the browser offers no WebGPU adapter (the GPU may be unsupported or blocked)".into());
    }
    let Some(info) = Reflect::get(&adapter, &"info".into()).ok().filter(|info| info.is_object()) else {
        return Ok(None);
    };

    let text = |key: &str| {
        Reflect::get(&info, &JsValue::from_str(key))
            .ok()
            .and_then(|value| value.as_string())
            .filter(|value| !value.is_empty())
    };
    let mut parts: Vec<String> =
        ["vendor", "architecture", "description"].iter().filter_map(|key| text(key)).collect();
    let fallback = Reflect::get(&info, &"isFallbackAdapter".into())
        .ok()
        .and_then(|value| value.as_bool())
        .unwrap_or(false);
    if fallback {
        parts.push("software fallback".to_string());
    }
    Ok((!parts.is_empty()).then(|| parts.join(" ")))
}

/// Native builds have no WebGPU; they exist only for unit tests of the pure helpers.
#[cfg(not(target_arch = "wasm32"))]
pub async fn init_webgpu() -> Result<Backend, String> {
    Err("WebGPU is only available in the browser build".into())
}

/// Selects burn's CPU backend and checks it with the same matrix product.
pub async fn init_cpu() -> Result<Backend, String> {
    let device = Device::flex();
    check_matmul(&device).await?;
    Ok(Backend {
        device,
        kind: BackendKind::Cpu,
        label: "CPU (burn flex, much slower than WebGPU)".into(),
    })
}

/// Multiplies two fixed 2 x 3 and 3 x 2 matrices on `device` and compares the product read back
/// with the one computed by hand, so a device that accepts work but computes nothing is caught.
async fn check_matmul(device: &Device) -> Result<(), String> {
    let lhs = Tensor::<2>::from_data(
        TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]),
        device,
    );
    let rhs = Tensor::<2>::from_data(
        TensorData::new(vec![7.0f32, 8.0, 9.0, 10.0, 11.0, 12.0], [3, 2]),
        device,
    );
    let product = lhs
        .matmul(rhs)
        .into_data_async()
        .await
        .map_err(|err| format!("reading the test product back from the device failed: {err:?}"))?
        .try_to_vec::<f32>()
        .map_err(|err| format!("the test product has an unexpected type: {err:?}"))?;

    let expected = [58.0f32, 64.0, 139.0, 154.0];
    let matches = product.len() == expected.len()
        && product.iter().zip(expected).all(|(got, want)| (got - want).abs() < 1e-3);
    if !matches {
        return Err(format!(
            "the device computed a wrong test product: {product:?} instead of {expected:?}"
        ));
    }
    Ok(())
}

//! Choosing where the engine runs: burn's pure-Rust CPU backend, or a GPU through wgpu (Vulkan,
//! Metal or DX12 natively, WebGPU in the browser).

use burn::tensor::Device;

#[cfg(feature = "wgpu")]
use crate::error::{EngineError, Result};

/// An initialized GPU device and what the driver reports about it.
#[derive(Clone, Debug)]
pub struct GpuDevice {
    pub device: Device,
    /// Adapter name as the driver reports it, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub adapter: String,
    /// Graphics API: "Vulkan", "Metal", "Dx12", "Gl" or "BrowserWebGpu".
    pub backend: String,
    /// "Cpu" for software rasterizers such as lavapipe or SwiftShader.
    pub device_type: String,
}

/// The pure-Rust CPU backend.
pub fn cpu() -> Device {
    Device::flex()
}

/// Initializes the default GPU adapter synchronously (native only).
#[cfg(all(feature = "wgpu", not(target_family = "wasm")))]
pub fn gpu() -> Result<GpuDevice> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .map_err(|e| EngineError::Device(format!("no usable GPU adapter through wgpu: {e:?}")))?;
    let info = setup.adapter.get_info();
    Ok(GpuDevice {
        device,
        adapter: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
    })
}

/// Initializes WebGPU in the browser (or the default adapter natively) without blocking.
#[cfg(feature = "wgpu")]
pub async fn gpu_async() -> Result<GpuDevice> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup_async()
        .await
        .map_err(|e| EngineError::Device(format!("WebGPU initialization failed: {e:?}")))?;
    let info = setup.adapter.get_info();
    Ok(GpuDevice {
        device,
        adapter: info.name,
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
    })
}

//! CLIP vision and text towers on burn, the recordings a forward pass can keep, and the
//! second-order lens of Gandelsman, Efros and Steinhardt ("Interpreting the Second-Order Effects
//! of Neurons in CLIP", ICLR 2025) computed by an exact factorization.

pub mod analysis;
pub mod assets;
pub mod atlas;
pub mod config;
pub mod decompose;
pub mod device;
pub mod error;
pub mod image;
pub mod lens;
pub mod model;
pub mod npy;
pub mod random;
pub mod text;
pub mod tokenizer;
pub mod vocabulary;
pub mod weights;

pub use burn::tensor::{Device, Tensor, TensorData};
pub use config::{Activation, ClipConfig, TextConfig, VisionConfig};
pub use error::{EngineError, Result};

//! The page's views.

mod alerts;
mod canvas;
mod dropzone;
mod header;
mod neuron_page;
mod results;
mod search;

pub use alerts::Alerts;
pub use dropzone::{file_list as dropzone_files, DropZone};
pub use header::Header;
pub use neuron_page::NeuronPage;
pub use results::Results;
pub use search::SearchPage;

//! HTTP downloads with byte progress, read chunk by chunk from the response body stream.

use std::fmt;

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStreamDefaultReader, Response};

/// Largest download the page accepts, in bytes. WebAssembly memory is at most 4 GiB, and loading
/// a model keeps the downloaded file and the model's tensors in memory at the same time.
pub const MAX_DOWNLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug)]
pub enum FetchError {
    /// The server returned 404 Not Found.
    NotFound { url: String },
    /// The server returned another non-success status.
    Status { url: String, status: u16, status_text: String },
    /// No response arrived: the host is unreachable, the request was blocked by CORS, or the
    /// connection broke.
    Network { url: String, detail: String },
    TooLarge { url: String, bytes: u64 },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::NotFound { url } => write!(f, "{url} was not found (HTTP 404)"),
            FetchError::Status { url, status, status_text } => {
                write!(f, "{url} returned HTTP {status} {status_text}")
            }
            FetchError::Network { url, detail } => write!(
                f,
                "the request for {url} failed ({detail}); check the address, and that the \
                 server allows cross-origin requests (CORS)"
            ),
            FetchError::TooLarge { url, bytes } => write!(
                f,
                "{url} is {} bytes, more than the {} bytes this page can hold in memory",
                bytes, MAX_DOWNLOAD_BYTES
            ),
        }
    }
}

/// Describes a JavaScript exception for an error message.
pub fn describe_js(value: &JsValue) -> String {
    if let Some(error) = value.dyn_ref::<js_sys::Error>() {
        return String::from(error.message());
    }
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}

/// Downloads `url` and returns its body. `on_progress(received, total)` runs after every chunk,
/// with `total` from Content-Length when the server sends one.
pub async fn fetch_bytes(
    url: &str,
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> Result<Vec<u8>, FetchError> {
    let network_error = |value: JsValue| FetchError::Network {
        url: url.to_string(),
        detail: describe_js(&value),
    };
    let window = web_sys::window().ok_or_else(|| FetchError::Network {
        url: url.to_string(),
        detail: "no browser window".into(),
    })?;

    let response: Response =
        JsFuture::from(window.fetch_with_str(url)).await.map_err(network_error)?.unchecked_into();
    if response.status() == 404 {
        return Err(FetchError::NotFound { url: url.to_string() });
    }
    if !response.ok() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: response.status(),
            status_text: response.status_text(),
        });
    }

    // Content-Length counts encoded bytes, so a compressed response can deliver more bytes than
    // announced; the progress bar then shows the count without a total.
    let total = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|text| text.trim().parse::<u64>().ok());
    if let Some(bytes) = total.filter(|bytes| *bytes > MAX_DOWNLOAD_BYTES) {
        return Err(FetchError::TooLarge { url: url.to_string(), bytes });
    }
    on_progress(0, total);

    let Some(body) = response.body() else {
        return Ok(Vec::new());
    };
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut bytes = Vec::with_capacity(total.unwrap_or(0) as usize);
    loop {
        let chunk = JsFuture::from(reader.read()).await.map_err(network_error)?;
        let done = Reflect::get(&chunk, &"done".into()).map_err(network_error)?;
        if done.as_bool().unwrap_or(false) {
            break;
        }
        let value: Uint8Array =
            Reflect::get(&chunk, &"value".into()).map_err(network_error)?.unchecked_into();
        let received = bytes.len() as u64 + value.length() as u64;
        if received > MAX_DOWNLOAD_BYTES {
            reader.release_lock();
            return Err(FetchError::TooLarge { url: url.to_string(), bytes: received });
        }
        let start = bytes.len();
        bytes.resize(start + value.length() as usize, 0);
        value.copy_to(&mut bytes[start..]);
        on_progress(received, total.filter(|total| *total >= received));
    }
    Ok(bytes)
}

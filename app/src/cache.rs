//! Downloads kept in the browser's Cache Storage and checked against an atlas manifest, so that a
//! second visit loads the model and its atlas from disk.
//!
//! Every file is verified (byte size and SHA-256) whether it comes from the network or from the
//! cache. A cached copy that fails the check is deleted and downloaded again; a download that
//! fails it is an error that names the file. Cache Storage problems (a browser that refuses it in
//! private windows, a full disk) only cost the caching: the page then downloads as before.

use js_sys::{ArrayBuffer, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, Response};

use engine::assets::{sha256_hex, verify, FileEntry};
use crate::fetch::{self, FetchError};

/// Name of the page's cache. A new format of cached entries gets a new name.
const CACHE_NAME: &str = "clip-lens-assets-v1";

/// The failure of [`fetch_verified`].
#[derive(Debug)]
pub enum Failure {
    Fetch(FetchError),
    /// The downloaded bytes are not the expected ones; they come back with the reason.
    Mismatch { bytes: Vec<u8>, reason: String },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Fetch(err) => err.fmt(f),
            Failure::Mismatch { reason, .. } => f.write_str(reason),
        }
    }
}

/// The origin of a verified file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Network,
    Cache,
}

/// The expected content of a download: a manifest entry, or only a SHA-256 (the model's
/// weights, which the manifest names by hash).
pub enum Expected<'a> {
    Entry(&'a FileEntry),
    Sha256 { name: &'a str, sha256: &'a str },
}

impl Expected<'_> {
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        match self {
            Expected::Entry(entry) => verify(entry, bytes).map_err(|err| err.to_string()),
            Expected::Sha256 { name, sha256 } => {
                let found = sha256_hex(bytes);
                if found == *sha256 {
                    Ok(())
                } else {
                    Err(format!(
                        "{name}: expected SHA-256 {sha256} (from the atlas manifest), found \
                         {found}; the weights are not the ones the atlas was built from"
                    ))
                }
            }
        }
    }
}

async fn open_cache() -> Option<Cache> {
    let caches = web_sys::window()?.caches().ok()?;
    let cache = JsFuture::from(caches.open(CACHE_NAME)).await.ok()?;
    cache.dyn_into::<Cache>().ok()
}

async fn cached_bytes(cache: &Cache, url: &str) -> Option<Vec<u8>> {
    let found = JsFuture::from(cache.match_with_str(url)).await.ok()?;
    let response = found.dyn_into::<Response>().ok()?;
    let buffer = JsFuture::from(response.array_buffer().ok()?).await.ok()?;
    let buffer = buffer.dyn_into::<ArrayBuffer>().ok()?;
    Some(Uint8Array::new(&buffer).to_vec())
}

async fn store(cache: &Cache, url: &str, bytes: &[u8]) {
    let array = Uint8Array::from(bytes);
    let Ok(response) = Response::new_with_opt_buffer_source(Some(&array)) else { return };
    if let Err(err) = JsFuture::from(cache.put_with_str(url, &response)).await {
        log::warn!("could not keep {url} in Cache Storage: {}", fetch::describe_js(&err));
    }
}

/// Returns the bytes of `url`, from Cache Storage when a verified copy is there, otherwise from
/// the network (with `on_progress(received, total)`), verified and then kept in the cache.
pub async fn fetch_verified(
    url: &str,
    expected: Expected<'_>,
    on_progress: impl FnMut(u64, Option<u64>),
) -> Result<(Vec<u8>, Source), Failure> {
    let cache = open_cache().await;
    if let Some(cache) = &cache {
        if let Some(bytes) = cached_bytes(cache, url).await {
            match expected.check(&bytes) {
                Ok(()) => return Ok((bytes, Source::Cache)),
                Err(reason) => {
                    log::warn!("discarding the cached copy of {url}: {reason}");
                    let _ = JsFuture::from(cache.delete_with_str(url)).await;
                }
            }
        }
    }
    let bytes = fetch::fetch_bytes(url, on_progress).await.map_err(Failure::Fetch)?;
    if let Err(reason) = expected.check(&bytes) {
        return Err(Failure::Mismatch { bytes, reason });
    }
    if let Some(cache) = &cache {
        store(cache, url, &bytes).await;
    }
    Ok((bytes, Source::Network))
}

/// Downloads a small file that changes with the atlas (its manifest): from the network first,
/// and from Cache Storage when the network fails, so that the page also opens offline. Returns
/// `Ok(None)` when the server returns 404.
pub async fn fetch_fresh(url: &str) -> Result<Option<Vec<u8>>, String> {
    let cache = open_cache().await;
    match fetch::fetch_bytes(url, |_, _| {}).await {
        Ok(bytes) => {
            if let Some(cache) = &cache {
                store(cache, url, &bytes).await;
            }
            Ok(Some(bytes))
        }
        Err(FetchError::NotFound { .. }) => Ok(None),
        Err(err @ FetchError::Network { .. }) => match &cache {
            Some(cache) => match cached_bytes(cache, url).await {
                Some(bytes) => {
                    log::info!("offline: using the cached copy of {url}");
                    Ok(Some(bytes))
                }
                None => Err(err.to_string()),
            },
            None => Err(err.to_string()),
        },
        Err(err) => Err(err.to_string()),
    }
}

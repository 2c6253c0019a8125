//! The atlas's image set: a recursive walk of a folder, and decoding in a background thread
//! so that the model does not wait for the decoder.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// Extensions of the image files the walk picks up, compared in lowercase.
pub const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff"];

/// Lists the image files under `root`, recursively: paths relative to `root` with `/` between
/// components, sorted by their UTF-8 bytes. Hidden files and folders (names starting with `.`)
/// are left out, and so are paths that are not valid UTF-8 (reported on stderr).
pub fn list(root: &Path) -> Result<Vec<String>> {
    if !root.is_dir() {
        bail!("{} is not a directory; --images needs a folder of images", root.display());
    }
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let entries = std::fs::read_dir(&dir).with_context(|| format!("cannot read the folder {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read the folder {}", dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                eprintln!("skipping {}: the name is not valid UTF-8", entry.path().display());
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            // Follows symbolic links, so a linked folder or image counts like a real one.
            let kind = std::fs::metadata(entry.path())
                .with_context(|| format!("cannot read {}", entry.path().display()))?;
            let path = relative.join(name);
            if kind.is_dir() {
                pending.push(path);
            } else if has_image_extension(name) {
                let parts: Vec<&str> = path.iter().map(|p| p.to_str().expect("checked above")).collect();
                found.push(parts.join("/"));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn has_image_extension(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)))
}

/// One image of the list, decoded and preprocessed, or the reason it could not be.
pub struct Decoded {
    /// Index in the image list.
    pub index: usize,
    pub pixels: std::result::Result<Vec<f32>, String>,
}

/// Decodes images in a background thread, in the order given.
pub struct Decoder {
    receiver: Receiver<Decoded>,
    thread: Option<JoinHandle<()>>,
}

impl Decoder {
    /// Starts decoding `indices` of `paths` (relative to `root`) to CLIP inputs of `size` pixels,
    /// keeping at most `ahead` decoded images waiting.
    pub fn start(root: &Path, paths: &[String], indices: Vec<usize>, size: usize, ahead: usize) -> Decoder {
        let (sender, receiver) = sync_channel(ahead.max(1));
        let root = root.to_path_buf();
        let paths: Vec<String> = indices.iter().map(|&i| paths[i].clone()).collect();
        let thread = std::thread::spawn(move || {
            for (index, path) in indices.into_iter().zip(paths) {
                let file = root.join(&path);
                let pixels = std::fs::read(&file)
                    .map_err(|e| format!("cannot read the file: {e}"))
                    .and_then(|bytes| engine::image::preprocess(&bytes, size).map_err(|e| e.to_string()))
                    .map(|p| p.pixels);
                if sender.send(Decoded { index, pixels }).is_err() {
                    // The receiver stopped early (an error elsewhere); nothing is left to do.
                    return;
                }
            }
        });
        Decoder { receiver, thread: Some(thread) }
    }

    /// Returns the next image, or `None` after the last.
    pub fn next(&mut self) -> Result<Option<Decoded>> {
        if let Ok(next) = self.receiver.recv() {
            return Ok(Some(next));
        }
        // The decoder turns every failure into a `Decoded` error, so the thread only ends early
        // by panicking.
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                bail!("the image decoding thread panicked");
            }
        }
        Ok(None)
    }
}

//! Text pools for the sparse text decomposition, and the ImageNet class names and prompt
//! templates of zero-shot classification.

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// The largest text pool `read_text_pool` accepts, in lines.
pub const MAX_POOL_LINES: usize = 1_000_000;

/// Reads a text pool: one description per line (UTF-8, `\n` or `\r\n` line ends), with
/// surrounding whitespace trimmed, empty lines skipped and a leading byte order mark ignored.
///
/// Rejects a file with more than `MAX_POOL_LINES` lines, a line that is not valid UTF-8, and a
/// file without any description.
pub fn read_text_pool(bytes: &[u8]) -> Result<Vec<String>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // A final line end does not start another line.
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut texts = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        if number > MAX_POOL_LINES {
            return Err(EngineError::Input(format!(
                "text pool: more than {MAX_POOL_LINES} lines; split it into smaller pools"
            )));
        }
        let line = std::str::from_utf8(line).map_err(|error| {
            EngineError::Input(format!(
                "text pool: line {number} is not valid UTF-8 (invalid byte at column {}); save \
                 the file as UTF-8",
                error.valid_up_to() + 1
            ))
        })?;
        let text = line.trim();
        if !text.is_empty() {
            texts.push(text.to_owned());
        }
    }
    if texts.is_empty() {
        return Err(EngineError::Input(
            "text pool: no descriptions (the file is empty or has only blank lines)".into(),
        ));
    }
    Ok(texts)
}

/// ImageNet's class names and the prompt templates for zero-shot classification, as
/// `assets/imagenet.json` ships them.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageNet {
    /// The 1,000 class names in class-index order.
    pub classes: Vec<String>,
    /// Prompt templates, each with one `{}` where the class name goes.
    pub templates: Vec<String>,
    /// The origin of the names and templates: package, version and file.
    pub source: String,
    pub license: String,
}

impl ImageNet {
    /// Parses the JSON of `assets/imagenet.json` and checks that there are classes and templates
    /// and that every template has exactly one `{}`.
    pub fn from_json(bytes: &[u8]) -> Result<ImageNet> {
        let imagenet: ImageNet = serde_json::from_slice(bytes).map_err(|error| {
            EngineError::Input(format!(
                "ImageNet metadata: invalid JSON ({error}); expected an object with `classes`, \
                 `templates`, `source` and `license`"
            ))
        })?;
        if imagenet.classes.is_empty() || imagenet.templates.is_empty() {
            return Err(EngineError::Input(format!(
                "ImageNet metadata: {} classes and {} templates; both lists must be non-empty",
                imagenet.classes.len(),
                imagenet.templates.len()
            )));
        }
        // Class names are stored one per line (classes.txt of an atlas).
        if let Some(index) = imagenet
            .classes
            .iter()
            .position(|name| name.contains(['\n', '\r']))
        {
            return Err(EngineError::Input(format!(
                "ImageNet metadata: class {index} ({:?}) contains a line break; class names must \
                 fit on one line",
                imagenet.classes[index]
            )));
        }
        if let Some(template) = imagenet
            .templates
            .iter()
            .find(|t| t.matches("{}").count() != 1)
        {
            return Err(EngineError::Input(format!(
                "ImageNet metadata: template {template:?} must contain exactly one `{{}}` for the \
                 class name"
            )));
        }
        Ok(imagenet)
    }

    /// Returns one prompt per template with `class` (a class name) in place of `{}`.
    pub fn prompts(&self, class: &str) -> Vec<String> {
        self.templates
            .iter()
            .map(|template| template.replacen("{}", class, 1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_trims_and_skips_blank_lines() {
        let texts = read_text_pool(b"\xEF\xBB\xBFdog\r\n  a photo of a cat \n\n\t\ntree").unwrap();
        assert_eq!(texts, ["dog", "a photo of a cat", "tree"]);
    }

    #[test]
    fn pool_rejects_invalid_utf8() {
        let error = read_text_pool(b"dog\ncat\nca\xFFt\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 3 is not valid UTF-8"), "{error}");
        assert!(error.contains("column 3"), "{error}");
    }

    #[test]
    fn pool_rejects_too_many_lines() {
        let bytes = "w\n".repeat(MAX_POOL_LINES + 1);
        let error = read_text_pool(bytes.as_bytes()).unwrap_err().to_string();
        assert!(error.contains("more than 1000000 lines"), "{error}");
    }

    #[test]
    fn pool_accepts_maximum_lines() {
        let bytes = "w\n".repeat(MAX_POOL_LINES);
        assert_eq!(
            read_text_pool(bytes.as_bytes()).unwrap().len(),
            MAX_POOL_LINES
        );
    }

    #[test]
    fn pool_rejects_empty_file() {
        assert!(read_text_pool(b"").is_err());
        assert!(read_text_pool(b"\n \n").is_err());
    }

    #[test]
    fn imagenet_prompts_fill_templates() {
        let json =
            br#"{"classes": ["tench", "goldfish"], "templates": ["a photo of a {}.", "{} art"],
            "source": "test", "license": "MIT"}"#;
        let imagenet = ImageNet::from_json(json).unwrap();
        assert_eq!(imagenet.classes, ["tench", "goldfish"]);
        assert_eq!(
            imagenet.prompts("goldfish"),
            ["a photo of a goldfish.", "goldfish art"]
        );
    }

    #[test]
    fn imagenet_rejects_template_without_slot() {
        let json =
            br#"{"classes": ["tench"], "templates": ["a photo"], "source": "", "license": ""}"#;
        let error = ImageNet::from_json(json).unwrap_err().to_string();
        assert!(error.contains("\"a photo\""), "{error}");
    }

    #[test]
    fn imagenet_rejects_line_break_in_class() {
        let json = br#"{"classes": ["dog", "a\nb"], "templates": ["{}"], "source": "", "license": ""}"#;
        let error = ImageNet::from_json(json).unwrap_err().to_string();
        assert!(error.contains("class 1"), "{error}");
        let json = br#"{"classes": ["a\rb"], "templates": ["{}"], "source": "", "license": ""}"#;
        assert!(ImageNet::from_json(json).is_err());
    }

    #[test]
    fn imagenet_rejects_missing_field() {
        let error = ImageNet::from_json(br#"{"classes": ["tench"]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("templates"), "{error}");
    }

    #[test]
    fn shipped_imagenet_has_1000_classes_and_80_templates() {
        let bytes = include_bytes!("../../assets/imagenet.json");
        let imagenet = ImageNet::from_json(bytes).unwrap();
        assert_eq!(imagenet.classes.len(), 1000);
        assert_eq!(imagenet.templates.len(), 80);
        assert_eq!(imagenet.classes[0], "tench");
        assert_eq!(imagenet.prompts("tench")[0], "a bad photo of a tench.");
    }

    #[test]
    fn shipped_vocabulary_has_30000_words() {
        let texts = read_text_pool(include_bytes!("../../assets/vocabulary.txt")).unwrap();
        assert_eq!(texts.len(), 30_000);
        assert_eq!(texts[0], "the");
        assert!(texts
            .iter()
            .all(|t| t.len() >= 2 && t.bytes().all(|b| b.is_ascii_lowercase())));
    }
}

//! CLIP's byte-level BPE tokenizer, producing the ids of open_clip's `SimpleTokenizer`
//! (`open_clip.tokenize`, open_clip_torch 3.3.0).
//!
//! open_clip cleans a text before it splits it into words: `ftfy.fix_text`, `html.unescape`
//! twice, whitespace collapse, lowercase. [`clean_text`] does the same in Rust, then the BPE model
//! of a Hugging Face `tokenizer.json` (loaded with the `tokenizers` crate) splits the words into
//! ids. The shipped `assets/clip-tokenizer.json` is made by `tools/make_tokenizer.py` from
//! open_clip's merges file; Hugging Face's CLIP `tokenizer.json` also works, because its
//! vocabulary and merges are the same.
//!
//! Differences from open_clip, all in ftfy 6.3.1's part of the cleaning:
//! - ftfy's mojibake repair (`fix_encoding`: text decoded with the wrong codec, such as "cafÃ©"
//!   for "café") has no Rust equivalent and is not done. Every other step of `fix_text` with its
//!   default settings is.
//! - Unicode tables differ by version: Python 3.11 uses Unicode 14, the Rust crates newer
//!   versions, so code points assigned after Unicode 14 may normalize, lowercase or match `\p{L}`
//!   differently.
//! - open_clip matches `<start_of_text>` and `<end_of_text>` written in the text only where its
//!   word pattern starts a match, the tokenizer anywhere, so `x<<end_of_text>` differs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use tokenizers::{NormalizerWrapper, Tokenizer};
use unicode_normalization::UnicodeNormalization;

use crate::error::{EngineError, Result};

/// Context length of every published CLIP text tower.
pub const CONTEXT_LENGTH: usize = 77;

/// Token names of the start and end tokens: open_clip's, then Hugging Face's.
const START_TOKEN_NAMES: &[&str] = &["<start_of_text>", "<|startoftext|>"];
const END_TOKEN_NAMES: &[&str] = &["<end_of_text>", "<|endoftext|>"];

/// CLIP's tokenizer: open_clip's cleaning plus a BPE `tokenizer.json`.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    start_id: u32,
    end_id: u32,
    context_length: usize,
}

impl ClipTokenizer {
    /// Parses a `tokenizer.json`; `source_name` names it in error messages.
    pub fn from_bytes(json: &[u8], source_name: &str) -> Result<Self> {
        let mut tokenizer = Tokenizer::from_bytes(json).map_err(|e| {
            EngineError::Input(format!("{source_name} is not a valid tokenizer.json: {e}"))
        })?;
        let find = |names: &[&str], role: &str| {
            names.iter().find_map(|name| tokenizer.token_to_id(name)).ok_or_else(|| {
                EngineError::Input(format!(
                    "{source_name} has no {role} token (looked for {}); is it CLIP's tokenizer?",
                    names.join(", ")
                ))
            })
        };
        let start_id = find(START_TOKEN_NAMES, "start")?;
        let end_id = find(END_TOKEN_NAMES, "end")?;

        // clean_text already does the file's normalization (NFC, whitespace, lowercase) as part
        // of open_clip's cleaning, in open_clip's order. The start and end tokens, truncation
        // and padding are applied by `encode` and `encode_padded`.
        tokenizer.with_normalizer(None::<NormalizerWrapper>);
        tokenizer.with_truncation(None).map_err(|e| {
            EngineError::Input(format!("{source_name}: cannot turn off truncation: {e}"))
        })?;
        tokenizer.with_padding(None);
        Ok(ClipTokenizer { tokenizer, start_id, end_id, context_length: CONTEXT_LENGTH })
    }

    /// Reads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| EngineError::io(format!("cannot read {}", path.display()), e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Sets the number of ids [`encode`](Self::encode) produces at most (77 unless changed),
    /// for text towers with another context length.
    pub fn with_context_length(mut self, context_length: usize) -> Result<Self> {
        if context_length < 2 {
            return Err(EngineError::Input(format!(
                "context length {context_length} leaves no room for the start and end tokens"
            )));
        }
        self.context_length = context_length;
        Ok(self)
    }

    pub fn start_id(&self) -> u32 {
        self.start_id
    }

    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Returns the number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Returns the ids of the cleaned text's words, without start and end tokens or truncation.
    pub fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        let cleaned = clean_text(text);
        let encoding = self.tokenizer.encode(cleaned.as_str(), false).map_err(|e| {
            EngineError::Input(format!("cannot tokenize {:?}: {e}", abbreviate(text)))
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenizes a text as `open_clip.tokenize` does, without the zero padding: the start id,
    /// the word ids and the end id. A text longer than the context is cut to its first
    /// `context_length - 2` word ids, keeping the end id last.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let words = self.encode_words(text)?;
        let kept = words.len().min(self.context_length - 2);
        let mut ids = Vec::with_capacity(kept + 2);
        ids.push(self.start_id);
        ids.extend_from_slice(&words[..kept]);
        ids.push(self.end_id);
        Ok(ids)
    }

    /// Tokenizes each text with [`encode`](Self::encode).
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|text| self.encode(text.as_ref())).collect()
    }

    /// Tokenizes a text into exactly `context_length` ids, zero-padded, as one row of
    /// `open_clip.tokenize`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        ids.resize(self.context_length, 0);
        Ok(ids)
    }

    /// Turns ids back into text; every end of word becomes a space, as in open_clip's decoder.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| EngineError::Input(format!("cannot decode ids {ids:?}: {e}")))
    }
}

fn abbreviate(text: &str) -> String {
    const MAX_CHARS: usize = 60;
    if text.chars().count() <= MAX_CHARS {
        text.to_string()
    } else {
        text.chars().take(MAX_CHARS).chain("...".chars()).collect()
    }
}

/// Cleans a text as open_clip's default `clean="lower"` does before tokenizing:
/// `ftfy.fix_text`, then `html.unescape` twice, then whitespace collapse and trimming, then
/// lowercasing. See the module documentation for what differs from ftfy.
pub fn clean_text(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    let collapsed: Vec<&str> = unescaped.split(is_python_whitespace).filter(|w| !w.is_empty()).collect();
    collapsed.join(" ").to_lowercase()
}

/// Python's `str.isspace`, which `str.split` and `str.strip` use: Unicode's White_Space
/// property plus the four information separators U+001C to U+001F.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// ftfy 6.3.1's `fix_text` with its default settings, without `fix_encoding`.
///
/// ftfy works on segments that end after each newline. It decodes HTML entities only while no
/// segment so far contained `<`, because such text may be HTML whose entities are meant.
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

/// ftfy's `fix_and_explain` on one segment: the fixes in ftfy's order, repeated until the text
/// no longer changes.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let previous = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        // NOTE: ftfy's fix_encoding (mojibake repair) would run here; it is not implemented, so
        // text such as "cafÃ©" keeps its mojibake.
        text = text.chars().map(fix_c1_control).collect();
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = text.chars().map(uncurl_quote).collect();
        text = text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text = remove_terminal_escapes(&text);
        text.retain(|c| !is_unwanted_control(c));
        text = text.nfc().collect();
        if text == previous {
            return text;
        }
    }
}

/// Windows-1252's characters for the bytes 0x80 to 0x9F. Bytes that Windows-1252 leaves
/// undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) keep the C1 control character of the same value,
/// as ftfy's "sloppy" codec and Python's `html.unescape` both do.
const WINDOWS_1252_HIGH: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

/// ftfy's `fix_c1_controls`: a C1 control character is read as the Windows-1252 byte.
fn fix_c1_control(c: char) -> char {
    match c as u32 {
        code @ 0x80..=0x9f => WINDOWS_1252_HIGH[(code - 0x80) as usize],
        _ => c,
    }
}

/// ftfy's `fix_latin_ligatures`: Latin ligatures and digraphs to their letters.
fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let replacement = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "\u{2bc}n",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(replacement);
    }
    out
}

/// ftfy's `fix_character_width`: the halfwidth and fullwidth forms (U+FF01 to U+FFEF) to their
/// NFKC equivalents, and the ideographic space to a space.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

/// ftfy's `uncurl_quotes`.
fn uncurl_quote(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}

/// ftfy's `remove_terminal_escapes`: drops ANSI sequences `ESC [ (digits or ;)* letter`. As in
/// ftfy's Python pattern, the digits are any Unicode decimal digits and the letter is ASCII.
fn remove_terminal_escapes(text: &str) -> String {
    static ANSI: OnceLock<regex::Regex> = OnceLock::new();
    let ansi = ANSI.get_or_init(|| {
        regex::Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("the ANSI escape pattern is valid")
    });
    ansi.replace_all(text, "").into_owned()
}

/// ftfy's `remove_control_chars`: ASCII controls other than tab, newline, form feed and carriage
/// return, deprecated Arabic format characters, the byte order mark, and interlinear annotation
/// and object replacement characters.
fn is_unwanted_control(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{8}'
            | '\u{b}'
            | '\u{e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}'
    )
}

/// ftfy's `unescape_html`: replaces `&name;` and `&#number;` (1 to 24 ASCII letters or digits
/// between `&` or `&#` and `;`) when the name is an HTML5 entity, or an all-caps form of a
/// lowercase entity such as `&EACUTE;`. Unlike `html.unescape` it leaves entities without a
/// semicolon alone.
fn ftfy_unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        match ftfy_entity_len(candidate) {
            Some(len) => {
                out.push_str(&ftfy_replace_entity(&candidate[..len]));
                rest = &candidate[len..];
            }
            None => {
                out.push('&');
                rest = &candidate[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Returns the byte length of a match of ftfy's `&#?[0-9A-Za-z]{1,24};` at the start of `text`.
fn ftfy_entity_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 1;
    if bytes.get(i) == Some(&b'#') {
        i += 1;
    }
    let name_start = i;
    while i < bytes.len() && bytes[i].is_ascii_alphanumeric() && i - name_start < 24 {
        i += 1;
    }
    let name_len = i - name_start;
    (name_len >= 1 && bytes.get(i) == Some(&b';')).then_some(i + 1)
}

fn ftfy_replace_entity(entity: &str) -> String {
    if let Some(expansion) = html5_entity(entity.as_bytes()) {
        return expansion.to_string();
    }
    if let Some(expansion) = uppercase_entities().get(entity) {
        return expansion.clone();
    }
    if entity.starts_with("&#") {
        let unescaped = html_unescape(entity);
        // A reference that html.unescape only partly decoded is left as it was.
        if !unescaped.contains(';') {
            return unescaped;
        }
    }
    entity.to_string()
}

/// Looks up `&name` or `&name;` in the HTML5 named character references.
fn html5_entity(key: &[u8]) -> Option<&'static str> {
    htmlize::ENTITIES
        .get(key)
        .map(|bytes| std::str::from_utf8(bytes).expect("HTML5 entity expansions are UTF-8"))
}

/// ftfy's all-caps entities: `&NAME;` for each lowercase entity `&name;` whose all-caps form is
/// not already meaningful to `html.unescape`, mapped to the uppercased expansion.
fn uppercase_entities() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = HashMap::new();
        for (key, expansion) in htmlize::ENTITIES.entries() {
            let Ok(key) = std::str::from_utf8(key) else { continue };
            if !key.ends_with(';') || key != key.to_lowercase() {
                continue;
            }
            let upper = key.to_uppercase();
            if html_unescape(&upper) == upper {
                let expansion = std::str::from_utf8(expansion).expect("expansions are UTF-8");
                table.insert(upper, expansion.to_uppercase());
            }
        }
        table
    })
}

/// Python's `html.unescape` (3.11): decodes `&#digits;`, `&#xhex;` and named references, with
/// or without the semicolon, using the longest entity name that prefixes an unknown name.
/// Invalid code points become U+FFFD or are dropped, and C1 values are read as Windows-1252,
/// as Python does.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let consumed = if after.starts_with('#') {
            numeric_reference(after, &mut out)
        } else {
            named_reference(after, &mut out)
        };
        match consumed {
            Some(len) => rest = &after[len..],
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes `#digits;?` or `#xhex;?` at the start of `text` into `out` and returns the bytes it
/// consumed, or `None` when `text` is no numeric reference.
fn numeric_reference(text: &str, out: &mut String) -> Option<usize> {
    let bytes = text.as_bytes();
    let (radix, digits_start) = match bytes.get(1) {
        Some(b'x' | b'X') => (16, 2),
        _ => (10, 1),
    };
    let digits_len = bytes[digits_start..]
        .iter()
        .take_while(|b| if radix == 16 { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
        .count();
    if digits_len == 0 {
        return None;
    }
    let digits = &text[digits_start..digits_start + digits_len];
    let mut end = digits_start + digits_len;
    if bytes.get(end) == Some(&b';') {
        end += 1;
    }
    // Python parses arbitrarily long numbers; any value past u32 is out of range all the same.
    let value = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
    match value {
        0 => out.push('\u{fffd}'),
        0x0d => out.push('\r'),
        0x80..=0x9f => out.push(WINDOWS_1252_HIGH[(value - 0x80) as usize]),
        0xd800..=0xdfff | 0x11_0000.. => out.push('\u{fffd}'),
        _ if is_invalid_code_point(value) => {}
        _ => out.push(char::from_u32(value).expect("surrogates and values past U+10FFFF are handled")),
    }
    Some(end)
}

/// Python's `html._invalid_codepoints` other than the C1 range: controls and noncharacters,
/// which `html.unescape` drops.
fn is_invalid_code_point(value: u32) -> bool {
    matches!(value, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (value & 0xfffe) == 0xfffe
}

/// Decodes a named reference at the start of `text` (after the `&`) into `out` and returns the
/// bytes it consumed. Python takes up to 32 characters other than tab, newline, form feed,
/// space, `<`, `&`, `#` and `;`, plus an optional `;`. An unknown name decodes its longest
/// prefix of at least two characters that is an entity, and keeps the rest.
fn named_reference(text: &str, out: &mut String) -> Option<usize> {
    let mut end = 0;
    for (count, c) in text.chars().enumerate() {
        if count == 32 || matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end += c.len_utf8();
    }
    if end == 0 {
        return None;
    }
    if text[end..].starts_with(';') {
        end += 1;
    }
    let name = &text[..end];
    let key = |prefix: &str| format!("&{prefix}");
    if let Some(expansion) = html5_entity(key(name).as_bytes()) {
        out.push_str(expansion);
        return Some(end);
    }
    let boundaries: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    for &cut in boundaries.iter().rev() {
        if let Some(expansion) = html5_entity(key(&name[..cut]).as_bytes()) {
            out.push_str(expansion);
            out.push_str(&name[cut..]);
            return Some(end);
        }
    }
    None
}

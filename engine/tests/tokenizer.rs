//! Compares the engine's CLIP tokenizer (assets/clip-tokenizer.json plus open_clip's cleaning in
//! Rust) with `open_clip.tokenize` of open_clip_torch 3.3.0 on the strings of
//! fixtures/text/tokenizer_cases.json, which `tools/fixtures_text.py` writes.

use std::path::{Path, PathBuf};

use engine::tokenizer::{clean_text, html_unescape, ClipTokenizer, CONTEXT_LENGTH};
use serde_json::Value;

/// Fixture groups the Rust cleaning is known to get wrong: ftfy's mojibake repair
/// (`fix_encoding`), which has no Rust port.
const KNOWN_DIFFERENT_GROUPS: &[&str] = &["mojibake"];

/// Single strings known to differ. open_clip finds a special token written in the text only
/// where its word pattern starts a match, and here `<<` is matched as one punctuation run; the
/// tokenizer finds special tokens anywhere.
const KNOWN_DIFFERENT_TEXTS: &[&str] = &["x<<end_of_text>"];

struct Case {
    group: String,
    text: String,
    cleaned: String,
    ids: Vec<u32>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> ClipTokenizer {
    let path = repo_root().join("assets/clip-tokenizer.json");
    ClipTokenizer::from_file(&path).unwrap_or_else(|e| {
        panic!("{e} (regenerate with /opt/refenv/bin/python tools/make_tokenizer.py)")
    })
}

fn cases() -> Vec<Case> {
    let path = repo_root().join("fixtures/text/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {}: {e} (regenerate with tools/fixtures_text.py)", path.display())
    });
    let document: Value = serde_json::from_str(&text).expect("tokenizer_cases.json is JSON");
    let string = |case: &Value, key: &str| case[key].as_str().expect("string field").to_string();
    document["cases"]
        .as_array()
        .expect("'cases' is an array")
        .iter()
        .map(|case| Case {
            group: string(case, "group"),
            text: string(case, "text"),
            cleaned: string(case, "cleaned"),
            ids: case["ids"]
                .as_array()
                .expect("'ids' is an array")
                .iter()
                .map(|id| id.as_u64().expect("ids are integers") as u32)
                .collect(),
        })
        .collect()
}

fn known_different(case: &Case) -> bool {
    KNOWN_DIFFERENT_GROUPS.contains(&case.group.as_str())
        || KNOWN_DIFFERENT_TEXTS.contains(&case.text.as_str())
}

#[test]
fn ids_match_open_clip() {
    let tokenizer = tokenizer();
    let cases = cases();
    assert!(cases.len() >= 300, "expected a few hundred fixture strings, found {}", cases.len());

    let mut failures = Vec::new();
    let mut agreeing = 0;
    for case in cases.iter().filter(|c| !known_different(c)) {
        let ids = tokenizer.encode(&case.text).expect("every fixture string tokenizes");
        if ids == case.ids {
            agreeing += 1;
        } else {
            failures.push(format!(
                "[{}] {:?}: cleaned {:?} (open_clip {:?})\n    engine    {ids:?}\n    open_clip {:?}",
                case.group,
                case.text,
                clean_text(&case.text),
                case.cleaned,
                case.ids
            ));
        }
    }
    println!("{agreeing} of {} fixture strings match open_clip's ids", cases.len());
    assert!(failures.is_empty(), "{} strings differ:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn cleaning_matches_open_clip() {
    let mut failures = Vec::new();
    for case in cases().iter().filter(|c| !known_different(c)) {
        let cleaned = clean_text(&case.text);
        if cleaned != case.cleaned {
            failures.push(format!("{:?}: engine {cleaned:?}, open_clip {:?}", case.text, case.cleaned));
        }
    }
    assert!(failures.is_empty(), "{} cleanings differ:\n{}", failures.len(), failures.join("\n"));
}

/// The exception lists must stay true: a listed string that starts to agree should leave them.
#[test]
fn known_differences_still_differ() {
    let tokenizer = tokenizer();
    let cases = cases();
    let listed: Vec<&Case> = cases.iter().filter(|c| known_different(c)).collect();
    assert!(!listed.is_empty(), "the fixtures should contain the documented differences");
    for case in listed {
        let ids = tokenizer.encode(&case.text).expect("every fixture string tokenizes");
        assert_ne!(
            ids, case.ids,
            "{:?} now matches open_clip; remove it from the known differences",
            case.text
        );
    }
}

#[test]
fn padded_rows_match_open_clip_layout() {
    let tokenizer = tokenizer();
    for case in cases().iter().filter(|c| !known_different(c)) {
        let padded = tokenizer.encode_padded(&case.text).expect("every fixture string tokenizes");
        assert_eq!(padded.len(), CONTEXT_LENGTH, "{:?}: padded length", case.text);
        assert_eq!(&padded[..case.ids.len()], case.ids.as_slice(), "{:?}: ids", case.text);
        assert!(padded[case.ids.len()..].iter().all(|&id| id == 0), "{:?}: padding", case.text);
    }
}

#[test]
fn long_text_keeps_end_token() {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode(&"word ".repeat(200)).expect("tokenizes");
    assert_eq!(ids.len(), CONTEXT_LENGTH);
    assert_eq!(ids[0], 49406, "start token");
    assert_eq!(ids[CONTEXT_LENGTH - 1], 49407, "end token kept last");
    assert!(ids[1..CONTEXT_LENGTH - 1].iter().all(|&id| id != 49407), "one end token");
}

#[test]
fn special_ids_and_vocabulary() {
    let tokenizer = tokenizer();
    assert_eq!(tokenizer.start_id(), 49406);
    assert_eq!(tokenizer.end_id(), 49407);
    assert_eq!(tokenizer.vocab_size(), 49408);
    assert_eq!(tokenizer.encode("").expect("tokenizes"), vec![49406, 49407]);
}

#[test]
fn decode_restores_words() {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode("A photo of a Café, 2024!").expect("tokenizes");
    let text = tokenizer.decode(&ids[1..ids.len() - 1]).expect("decodes");
    assert_eq!(text.trim_end(), "a photo of a café , 2 0 2 4 !");
}

#[test]
fn html_unescape_follows_python() {
    // Expected values from Python 3.11's html.unescape.
    for (escaped, expected) in [
        ("&amp;", "&"),
        ("&amp", "&"),
        ("&notit;", "\u{ac}it;"),
        ("&#65;&#x42;&#X43", "ABC"),
        ("&#0;", "\u{fffd}"),
        ("&#x80;", "\u{20ac}"),
        ("&#1;", ""),
        ("&#xFFFF;", ""),
        ("&#99999999999;", "\u{fffd}"),
        ("&unknown;", "&unknown;"),
        ("& amp;", "& amp;"),
        ("&;", "&;"),
    ] {
        assert_eq!(html_unescape(escaped), expected, "html_unescape({escaped:?})");
    }
}

#[test]
fn invalid_tokenizer_file_is_rejected() {
    let error = ClipTokenizer::from_bytes(b"{\"not\": \"a tokenizer\"}", "broken.json")
        .err()
        .expect("a JSON file that is no tokenizer is rejected");
    assert!(error.to_string().contains("broken.json"), "error names the file: {error}");
}

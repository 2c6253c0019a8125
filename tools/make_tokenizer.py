"""Convert open_clip's bundled BPE merges into a `tokenizer.json` for the Hugging Face tokenizers
library (Rust crate and Python package), written to assets/clip-tokenizer.json.

Source: `bpe_simple_vocab_16e6.txt.gz` inside the installed open_clip_torch 3.3.0 package (MIT
license; the file is OpenAI CLIP's, also MIT). The tokenizer it describes reproduces
`open_clip.tokenizer.SimpleTokenizer.encode` on text that has already been through open_clip's
cleaning (ftfy.fix_text, html.unescape twice, whitespace collapse, lowercase); the Rust wrapper in
engine/src/tokenizer.rs does that cleaning before it calls the tokenizer.

Vocabulary order, as SimpleTokenizer builds it: the 256 byte symbols, the same 256 with the
end-of-word suffix `</w>`, one token per merge in merge order, then `<start_of_text>` (49406) and
`<end_of_text>` (49407).

Run with the reference environment (see tools/requirements.txt):

    /opt/refenv/bin/python tools/make_tokenizer.py

The script then checks the written file with the tokenizers package against SimpleTokenizer on
every vocabulary word and on a set of sentences, and exits non-zero on any disagreement.
"""

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "assets" / "clip-tokenizer.json"

START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
# SimpleTokenizer reads merge lines 1 to 48894 of the file (line 0 is a version header), which
# gives 512 byte tokens + 48894 merges + 2 special tokens = 49408 ids.
MERGE_COUNT = 48894
# CLIP's word pattern without its leading special-token alternatives, which the tokenizer matches
# as added tokens instead: contractions, letter runs, single digits, runs of everything else that
# is not whitespace.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list:
    """Return the printable stand-in character of each byte value, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 byte values are moved to the code
    points 256, 257, ... in increasing byte order, so that no symbol is whitespace or a control
    character. The list is ordered like CLIP's: printable bytes first, then the moved ones.
    """
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    symbols = [chr(b) for b in printable]
    moved = 0
    for value in range(256):
        if value not in printable:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def find_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        sys.exit("open_clip is not installed in this Python; pass --bpe PATH "
                 "(bpe_simple_vocab_16e6.txt.gz from the open_clip_torch package)")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def read_merges(path: Path) -> list:
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]
    if len(merges) != MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        sys.exit(f"{path}: expected {MERGE_COUNT} merge lines of two symbols after the header")
    return merges


def build_tokenizer_json(merges: list) -> dict:
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        sys.exit("the merges produce duplicate vocabulary entries; is this CLIP's merges file?")
    start_id, end_id = vocab[START_TOKEN], vocab[END_TOKEN]

    def added(content: str, index: int) -> dict:
        # normalized: true, so that the lowercased text is searched, as CLIP matches the special
        # tokens case-insensitively after lowercasing.
        return {"id": index, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": True, "special": True}

    def special(name: str) -> dict:
        return {"SpecialToken": {"id": name, "type_id": 0}}

    def sequence(name: str) -> dict:
        return {"Sequence": {"id": name, "type_id": 0}}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(START_TOKEN, start_id), added(END_TOKEN, end_id)],
        # The part of open_clip's cleaning that a normalizer can express. The Rust wrapper
        # replaces it by the full cleaning (ftfy's fixes, HTML unescaping) in open_clip's order.
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Strip", "strip_left": True, "strip_right": True},
            {"type": "Lowercase"},
        ]},
        # Keep the pattern's matches and drop what lies between them (whitespace), then map
        # each UTF-8 byte to its stand-in symbol.
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": WORD_PATTERN}, "behavior": "Removed",
             "invert": True},
            byte_level,
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(START_TOKEN), sequence("A"), special(END_TOKEN)],
            "pair": [special(START_TOKEN), sequence("A"), special(END_TOKEN),
                     special(START_TOKEN), sequence("B"), special(END_TOKEN)],
            "special_tokens": {
                START_TOKEN: {"id": START_TOKEN, "ids": [start_id], "tokens": [START_TOKEN]},
                END_TOKEN: {"id": END_TOKEN, "ids": [end_id], "tokens": [END_TOKEN]},
            },
        },
        # Bytes back to text, and each end-of-word suffix to a space, as SimpleTokenizer.decode.
        "decoder": {"type": "Sequence", "decoders": [
            byte_level,
            {"type": "Replace", "pattern": {"String": END_OF_WORD}, "content": " "},
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": END_OF_WORD,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


SENTENCES = [
    "a photo of a cat",
    "A Photo Of A Dog, taken in 1999!!!",
    "don't you're we've I'm they'll she'd it's",
    "Café naïve résumé façade Ångström",
    "東京タワー と 富士山",
    "Москва — столица России",
    "emoji 🐈‍⬛ and 👍🏽 and 🇫🇷",
    "tabs\tand\nnewlines  and   spaces",
    "x" * 300,
    "",
]


def check(path: Path, merges_path: Path) -> None:
    """Compare the tokenizers package on the written file with open_clip's SimpleTokenizer."""
    import tokenizers
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer(bpe_path=str(merges_path))
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    words = [token.removesuffix(END_OF_WORD) for token in reference.encoder
             if token not in (START_TOKEN, END_TOKEN)]
    # The byte symbols above 255 stand for bytes that are not valid UTF-8 on their own, so
    # they are no text to encode.
    texts = [w for w in words if all(ord(c) < 256 for c in w)] + SENTENCES
    mismatches = []
    for text in texts:
        cleaned = reference.clean_fn(text)
        expected = [reference.sot_token_id] + reference.encode(text) + [reference.eot_token_id]
        actual = tokenizer.encode(cleaned).ids
        if actual != expected:
            mismatches.append((text, expected, actual))
    print(f"checked {len(texts)} texts against open_clip's SimpleTokenizer: "
          f"{len(mismatches)} mismatches")
    for text, expected, actual in mismatches[:10]:
        print(f"  {text!r}: open_clip {expected}, tokenizer.json {actual}")
    if mismatches:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz "
                        "(default: the one in the installed open_clip package)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison with open_clip (needs tokenizers and open_clip)")
    args = parser.parse_args()

    merges_path = args.bpe or find_bpe_file()
    merges = read_merges(merges_path)
    document = build_tokenizer_json(merges)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Compact separators keep the file at about 1.5 MB. Keys are not sorted, because the
    # vocabulary in insertion order lists the tokens by id, which makes the file easy to read.
    args.out.write_text(json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, "
          f"{len(document['model']['vocab'])} tokens, {len(merges)} merges)")
    if not args.no_check:
        check(args.out, merges_path)


if __name__ == "__main__":
    main()

"""Write the text-side fixtures in fixtures/text/ (described in fixtures/text/README.md):

- tokenizer_cases.json: varied strings with the cleaned text and the token ids of open_clip's
  `tokenize` (open_clip_torch 3.3.0, ftfy 6.3.1), for engine/tests/tokenizer.rs;
- embeddings/: a token batch of varied lengths and the text embeddings that open_clip and
  transformers compute for it with the tiny models of fixtures/models/, for
  engine/tests/text_tower.rs.

Run with the reference environment (see tools/requirements.txt) after tools/fixtures_models.py:

    /opt/refenv/bin/python tools/fixtures_text.py

Reruns write identical files.
"""

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import torch
import transformers
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "text"
MODELS = ROOT / "fixtures" / "models"

SEED_STRINGS = 3001
SEED_TOKENS = 3002
CONTEXT_LENGTH = 77


def handwritten_cases() -> list:
    """Return (group, text) pairs that each exercise one part of the tokenizer or the cleaning."""
    long_sentence = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    cases = {
        "plain": [
            "a photo of a cat", "a photo of a {}.", "A PHOTO OF A DOG", "itap of a golden retriever",
            "a bad photo of the tench", "a black and white photo of a goldfinch",
            "origami", "the", "a", "I", "supercalifragilisticexpialidocious",
            "antidisestablishmentarianism", "photosynthesis", "ceci n'est pas une pipe",
        ],
        "contractions": [
            "don't", "DON'T", "I'm", "you're", "we've", "they'll", "she'd", "it's", "rock 'n' roll",
            "'s", "''quoted''", "the dog's bone", "o'clock", "she'd've", "y'all'd've",
            "'twas", "it 's", "ma'am", "TEST'S",
        ],
        "digits": [
            "1234567890", "3.14159", "2024-01-01", "1,000,000", "v2.0.1", "0", "007",
            "covid-19", "4x4", "100%", "$9.99", "Ⅷ", "²³", "½ cup", "١٢٣", "४२", "一二三",
            "1st 2nd 3rd 4th", "route 66",
        ],
        "punctuation": [
            "!!!???", "...", "…", "—", "a--b", "(a)[b]{c}", "@#$%^&*", "a_b_c", "snake_case_name",
            "http://example.com/path?x=1&y=2", "user@example.com", "#hashtag @mention",
            "\"quoted\"", "C++ and C#", ":-) ;-) :D", "a/b\\c", "¿qué?", "¡hola!", "« guillemets »",
            "..:;;,,", "~`|<>", "=>", "a.b.c.", "!", "?",
        ],
        "accents": [
            "café", "cafe\u0301", "naïve", "nai\u0308ve", "Ångström", "A\u030angstro\u0308m",
            "\u212bngström", "ñandú", "n\u0303andu\u0301", "Crème Brûlée", "Dvořák", "Łódź",
            "İstanbul", "straße", "STRASSE", "ÆØÅ æøå", "Ǆemal ǅemal", "ÉCOLE", "ǅ",
        ],
        "scripts": [
            "東京タワーと富士山", "我爱北京天安门", "日本語のテキスト", "한국어 텍스트",
            "\u1112\u1161\u11ab\u1100\u1173\u11af", "Москва — столица России",
            "ΟΔΟΣ ΟΔΟΣ. σοφός", "Ελληνικά", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
            "สวัสดีชาวโลก", "Բարեւ", "გამარჯობა", "ⴰⵣⵓⵍ", "ᓀᐦᐃᔭᐍᐏᐣ", "ꦲꦏ꧀ꦱꦫ",
        ],
        "emoji": [
            "🐈", "🐈‍⬛", "👍🏽", "🇫🇷🇯🇵", "1️⃣", "❤️", "👨‍👩‍👧‍👦", "cat 🐱 dog 🐶", "☀☁☂",
            "🏳️‍🌈", "✔ done", "😀😃😄😁",
        ],
        "whitespace": [
            "tabs\tand\ttabs", "new\nline", "windows\r\nline", "old mac\rline", "  leading",
            "trailing  ", "many     spaces", "\t\n \r", " ", "vertical\x0btab",
            "form\x0cfeed", "no\u00a0break", "ideographic\u3000space", "zero\u200bwidth",
            "line\u2028separator", "para\u2029separator", "next\u0085line",
            "thin\u2009space", "em\u2003space",
        ],
        "html": [
            "&amp;", "&lt;b&gt;", "&amp;amp;", "&amp;amp;amp;amp;", "&#39;", "&#x27;", "&#X27;",
            "&eacute;", "&EACUTE;", "&Eacute;", "&nbsp;", "&copy", "&copy;2024", "&notit;",
            "AT&T", "R&D", "&#128512;", "&#0;", "&#x80;", "&#x9F;", "&#xD800;", "&#1;",
            "&#1114112;", "<b>bold</b> &amp; co", "&amp;lt;", "fish &amp; chips", "&quot;hi&quot;",
            "&unknownentity;", "&#65;&#66;&#67;", "&hellip; &mdash; &rarr;", "5 &lt; 6 &gt; 4",
            "a &lt;tag&gt;\nsecond &amp;amp; line", "<first line\nsecond &amp;amp; line",
            "&AMP;", "&NTILDE;", "&frac12;", "&ampx", "&lt", "&times3",
        ],
        "ftfy": [
            "‘single’ “double”", "„low“", "ﬁne ﬂour", "ﬀ ﬃ ﬄ ﬅ ﬆ", "Ĳssel ĳs", "ＬＯＵＤ　ＮＯＩＳＥＳ",
            "ｶﾀｶﾅ", "ﾊﾟﾝ", "\x1b[31mred\x1b[0m text", "\ufeffbom", "nul\x00char", "bell\x07",
            "del\x7fete", "\x96dash\x96", "\x93smart\x94", "a\u206ab", "obj\ufffcect", "ﬁ&amp;ﬂ",
            "ŉ", "ʼn", "‛reversed‛",
        ],
        # ftfy.fix_encoding's mojibake repair, which the Rust cleaning does not implement.
        "mojibake": [
            "Ã©", "âœ” No problems", "sÃ³", "voilÃ  le travail", "The Mona Lisa doesnÃ¢â‚¬â„¢t",
            "Ã¼ber", "caf\u00c3\u00a9",
        ],
        "special_tokens": [
            "<start_of_text>", "<END_OF_TEXT>", "a <end_of_text> b", "x<<end_of_text>",
            "<|endoftext|>", "<start_of_text><end_of_text>",
        ],
        "length": [
            long_sentence, "a " * 74, "a " * 75, "a " * 76, "word" * 100, "!" * 200,
            "😀" * 80, "東" * 100,
        ],
        "empty": [""],
    }
    # Every C1 control character, raw (ftfy reads it as Windows-1252) and as a numeric character
    # reference (html.unescape maps it the same way).
    cases["c1_controls"] = [f"c1 {chr(code)} x" for code in range(0x80, 0xA0)]
    cases["c1_controls"] += [f"&#{code};" for code in range(0x80, 0xA0)]
    return [(group, text) for group, texts in cases.items() for text in texts]


def random_cases(count: int) -> list:
    """Return `count` seeded random strings drawn from letters, digits, punctuation, accents,
    several scripts, emoji, combining marks and whitespace."""
    rng = random.Random(SEED_STRINGS)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿĀāĂăĄąĆćČčĎďĘęĚěĞğİıŁłŃńŇňŐőŒœŘřŚśŠšŤťŮůŰűŸŹźŻżŽž",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГД",
        "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΣ",
        "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
        "あいうえおかきくけこアイウエオカキクケコ",
        "가나다라마바사아자차카타파하",
        "\u0301\u0308\u0303\u030a\u0327",
        "😀😂🐈🐶🍎🚗🇫🇷👍🏽‍",
        " \t\n",
        "’‘“”…–—",
    ]
    cases = []
    for _ in range(count):
        length = rng.randint(1, 40)
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(length))
        cases.append(("random", text))
    return cases


def tokenizer_cases() -> list:
    tokenizer = open_clip.tokenizer._tokenizer
    cases = handwritten_cases()
    cases += [("imagenet", name) for name in IMAGENET_CLASSNAMES[::5]]
    cases += random_cases(100)

    out = []
    for group, text in cases:
        row = open_clip.tokenize([text], context_length=CONTEXT_LENGTH)[0].tolist()
        # Drop the zero padding: the end token is always the last nonzero id.
        length = max(i for i, token in enumerate(row) if token != 0) + 1
        out.append({
            "group": group,
            "text": text,
            "cleaned": tokenizer.clean_fn(text),
            "ids": row[:length],
        })
    return out


def token_batch() -> np.ndarray:
    """Return [B, 77] token ids for the tiny models (vocabulary 1000): start id 998, random ids,
    end id 999 (the largest id, where both libraries pool), zero padding. Lengths cover the
    shortest sequence (start and end only), repeated lengths (so a length group holds several
    rows) and the full context."""
    start, end = 998, 999
    lengths = [2, 3, 3, 5, 8, 8, 8, 13, 21, 34, 55, 76, 77, 77]
    rng = np.random.default_rng(SEED_TOKENS)
    tokens = np.zeros((len(lengths), CONTEXT_LENGTH), dtype=np.int64)
    for row, length in enumerate(lengths):
        tokens[row, 0] = start
        tokens[row, 1:length - 1] = rng.integers(1, start, size=length - 2)
        tokens[row, length - 1] = end
    return tokens


def open_clip_model(directory: Path) -> open_clip.model.CLIP:
    config = json.loads((directory / "config.json").read_text())
    config = config.get("model_cfg", config)
    model = open_clip.model.CLIP(
        config["embed_dim"],
        vision_cfg=config["vision_cfg"],
        text_cfg=config["text_cfg"],
        quick_gelu=config.get("quick_gelu", False),
    )
    state = safetensors.torch.load_file(directory / "model.safetensors")
    model.load_state_dict(state)
    return model.eval()


def text_embeddings(tokens: np.ndarray) -> dict:
    ids = torch.from_numpy(tokens)
    out = {}
    with torch.no_grad():
        for name in ("openclip-quickgelu", "openclip-gelu"):
            model = open_clip_model(MODELS / name)
            out[name] = model.encode_text(ids, normalize=False).numpy()
        model = transformers.CLIPModel.from_pretrained(MODELS / "hf-clip").eval()
        features = model.get_text_features(input_ids=ids)
        # transformers 4.x returns a tensor, 5.x a BaseModelOutputWithPooling.
        if not isinstance(features, torch.Tensor):
            features = features.pooler_output
        out["hf-clip"] = features.numpy()
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cases = tokenizer_cases()
    document = {
        "source": "open_clip.tokenize (open_clip_torch " + open_clip.__version__ + ")",
        "context_length": CONTEXT_LENGTH,
        "cases": cases,
    }
    path = OUT / "tokenizer_cases.json"
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}: {len(cases)} strings")

    embeddings_dir = OUT / "embeddings"
    embeddings_dir.mkdir(exist_ok=True)
    tokens = token_batch()
    # Token ids are stored as float32, like fixtures/models/*/expected/text_tokens.npy.
    np.save(embeddings_dir / "tokens.npy", tokens.astype(np.float32))
    for name, embedding in text_embeddings(tokens).items():
        np.save(embeddings_dir / f"{name}.npy", embedding.astype(np.float32))
        print(f"wrote {(embeddings_dir / name).relative_to(ROOT)}.npy: {embedding.shape}")


if __name__ == "__main__":
    main()

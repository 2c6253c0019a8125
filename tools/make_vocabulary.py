"""Write assets/vocabulary.txt, the default text pool of the sparse text decomposition: 30,000
alphabetic whole-word tokens of CLIP's BPE vocabulary, earliest merges first.

Reads assets/clip-tokenizer.json (written by tools/make_tokenizer.py; no network). The script
keeps the tokens that end in the end-of-word suffix `</w>`, drops the suffix, keeps those of at
least two letters a-z only, and writes the first 30,000 by token id, one per line. Token ids
follow merge order, and BPE merges the most frequent pair of its training text first, so early
tokens are roughly the frequent ones. The list is mostly common English words, and also contains
word endings that are tokens of their own ("ing", "ers"), names and words of other languages.

Run with any Python 3:

    python3 tools/make_vocabulary.py

Reruns write identical files.
"""

import json
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER = ASSETS / "clip-tokenizer.json"
OUTPUT = ASSETS / "vocabulary.txt"

WORDS = 30_000
END_OF_WORD = "</w>"
WORD = re.compile(r"[a-z]{2,}")


def main() -> None:
    vocabulary = json.loads(TOKENIZER.read_text(encoding="utf-8"))["model"]["vocab"]
    words = sorted(
        (token_id, token[: -len(END_OF_WORD)])
        for token, token_id in vocabulary.items()
        if token.endswith(END_OF_WORD) and WORD.fullmatch(token[: -len(END_OF_WORD)])
    )
    if len(words) < WORDS:
        raise SystemExit(f"{TOKENIZER} has {len(words)} alphabetic whole-word tokens; expected at least {WORDS}")
    selected = [word for _, word in words[:WORDS]]
    OUTPUT.write_text("\n".join(selected) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT}: {len(selected)} of {len(words)} words, ids {words[0][0]} to {words[WORDS - 1][0]}")


if __name__ == "__main__":
    main()

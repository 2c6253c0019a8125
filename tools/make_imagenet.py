"""Write assets/imagenet.json: ImageNet's 1,000 class names and OpenAI's 80 prompt templates for
zero-shot classification, from `open_clip/zero_shot_metadata.py` of the installed
open_clip_torch 3.3.0 package (MIT license).

open_clip stores the templates as lambdas; each is called with "{}" to get its format string.

Run with the reference environment (see tools/requirements.txt):

    /opt/refenv/bin/python tools/make_imagenet.py

Reruns write identical files.
"""

import json
from importlib.metadata import version
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

OUTPUT = Path(__file__).resolve().parent.parent / "assets" / "imagenet.json"
EXPECTED_VERSION = "3.3.0"


def main() -> None:
    package_version = version("open_clip_torch")
    if package_version != EXPECTED_VERSION:
        raise SystemExit(f"open_clip_torch {package_version} is installed; expected {EXPECTED_VERSION}")

    templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    for template in templates:
        if template.count("{}") != 1:
            raise SystemExit(f"template {template!r} does not have exactly one {{}}")
    classes = list(IMAGENET_CLASSNAMES)
    if len(classes) != 1000 or len(templates) != 80:
        raise SystemExit(f"found {len(classes)} classes and {len(templates)} templates; expected 1000 and 80")

    metadata = {
        "classes": classes,
        "templates": templates,
        "source": (
            f"open_clip_torch {package_version}, open_clip/zero_shot_metadata.py: "
            "IMAGENET_CLASSNAMES and OPENAI_IMAGENET_TEMPLATES (each template called with '{}')"
        ),
        "license": "MIT (open_clip: Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, "
        "Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok "
        "Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt)",
    }
    OUTPUT.write_text(json.dumps(metadata, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT}: {len(classes)} classes, {len(templates)} templates")


if __name__ == "__main__":
    main()

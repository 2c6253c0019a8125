"""Times open_clip's ViT-B-32 image tower on the CPU with random weights, for comparison with
`clip-lens bench --preset ViT-B-32` (docs/benchmarks.md records both).

Run: /opt/refenv/bin/python tools/bench_torch.py --batch 1 --iterations 5
The environment comes from tools/requirements.txt. No weights are downloaded.
"""

import argparse
import json
import statistics
import time

import open_clip
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model config name")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--iterations", type=int, default=5, help="timed runs after one warm-up")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(args.batch, 3, size, size)

    times = []
    with torch.inference_mode():
        model.encode_image(pixels)
        for _ in range(args.iterations):
            start = time.perf_counter()
            model.encode_image(pixels)
            times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({
        "model": args.model,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "forward_ms_per_image": statistics.median(times) / args.batch,
    }))


if __name__ == "__main__":
    main()

"""What `train.py`'s check of every image up front costs, against what its loader spends on the same images per epoch.

Before it trains, `train.py` decodes every image it will read once, at the JPEG decoder's smallest scale
(`ImageCaptionDataset.check_images(decode=True)`, `--verify-images`, on by default), so that a corrupt file stops the
run at once instead of hours in. This measures, over the same rows and in rounds whose order alternates (pooled):

- ``verify_1_thread`` and ``verify_2_threads``: that check;
- ``exists_only``: the check without decoding (``--no-verify-images``);
- ``loader_epoch``: what the training loader does with each image every epoch, in one process: `images.load_image`
  at full size and the training transform of the CPU recipe (tf_efficientnet_lite0, 288 px, whole image).

The ratios ``loader_epoch / verify_*`` say how many epochs of image loading the check costs (its images/s over the
loader's: a ratio of 10 means the check costs a tenth of one epoch's loading).

    python benchmarks/verify_images.py --data-dir ../shared/comp5329 --output benchmarks/results/verify-images-cpu.json
    python benchmarks/verify_images.py --smoke --output /tmp/verify.json       # CI: generated demo data
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as throughput.py: idle OpenMP threads do not spin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from multimodal.annotations import read_annotations  # noqa: E402
from multimodal.data import ImageCaptionDataset  # noqa: E402
from multimodal.images import build_transform, load_image  # noqa: E402
from throughput import machine_info, paired, ratio  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MULTIMODAL_COMP5329"),
                   help="dataset folder: the first --images rows of its train.csv (default: $MULTIMODAL_COMP5329)")
    p.add_argument("--images", type=int, default=4000, help="rows per measurement")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the measurements, order alternating")
    p.add_argument("--encoder", default="tf_efficientnet_lite0", help="whose training transform the loader applies")
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--image-crop", default="full", choices=["center", "full"])
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--smoke", action="store_true", help="generated demo data, 40 rows, one round (for CI)")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        from multimodal.demo import make_demo_dataset
        data_dir = make_demo_dataset(Path(tempfile.mkdtemp(prefix="verify_images_")) / "data", num_train=40,
                                     num_test=0, image_size=48)
        args.images, args.rounds, args.image_size = 40, 1, 32
    elif not args.data_dir:
        raise SystemExit("give --data-dir (or MULTIMODAL_COMP5329)")
    else:
        data_dir = Path(args.data_dir)
    frame = read_annotations(data_dir / "train.csv").iloc[: args.images].reset_index(drop=True)
    dataset = ImageCaptionDataset(frame, data_dir / "data")
    paths = [dataset.image_path(i) for i in range(len(frame))]
    transform = build_transform(args.encoder, args.image_size, training=True, crop=args.image_crop)
    torch.set_num_threads(1)  # the loader's workers each run one thread
    print(f"{len(frame)} images of {data_dir}; loader transform: {args.encoder} {args.image_size} px "
          f"({args.image_crop}), training", flush=True)

    def verify(threads: int) -> tuple[int, float]:
        start = time.perf_counter()
        assert dataset.check_images(decode=True, workers=threads) == []
        return len(frame), time.perf_counter() - start

    def exists_only() -> tuple[int, float]:
        start = time.perf_counter()
        assert dataset.check_images() == []
        return len(frame), time.perf_counter() - start

    def loader_epoch() -> tuple[int, float]:
        start = time.perf_counter()
        for path in paths:
            transform(load_image(path))
        return len(paths), time.perf_counter() - start

    verify(1)  # warm-up (not timed): the page cache for the JPEGs
    names = ("verify_1_thread", "verify_2_threads", "exists_only", "loader_epoch")
    measured = paired(names, (lambda: verify(1), lambda: verify(2), exists_only, loader_epoch), args.rounds)
    results = {
        "benchmark": "verify_images", "machine": machine_info(torch.device("cpu")),
        "command": " ".join(["python", "benchmarks/verify_images.py", *sys.argv[1:]]),
        "rows": len(frame), "loader_transform": {"encoder": args.encoder, "image_size": args.image_size,
                                                 "crop": args.image_crop, "training": True},
        "measured": measured,
        "ratios": {"verify_1_thread/loader_epoch": ratio(measured["verify_1_thread"], measured["loader_epoch"]),
                   "verify_2_threads/loader_epoch": ratio(measured["verify_2_threads"], measured["loader_epoch"]),
                   "verify_2_threads/verify_1_thread": ratio(measured["verify_2_threads"],
                                                             measured["verify_1_thread"])},
    }
    for key, value in results["ratios"].items():
        print(f"  {key:<34s} {value:.3f} (speed)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())

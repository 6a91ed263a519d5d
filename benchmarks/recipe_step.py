#!/usr/bin/env python3
"""The CPU recipe's training step (`cpu_full_e4` in RESULTS.md) with and without the sixth session's two changes.

The recipe trains on cached feature maps: the image encoder's last stage, the caption encoder, the heads and the label
decoder, batch 64. With the image encoder's costly stages cached, the caption LSTM is a large share of each step, so
this is where how it meets padding matters most. One run steps four copies of the model, batch by batch in turn (the
order alternating), on the same batches:

- ``packed+loop``: the caption LSTM on packed captions, the default (for-loop) AdamW (the code before the change);
- ``padded+loop``, ``packed+fused``: one change each;
- ``padded+fused``: both (``train.py`` on a CPU now).

    python benchmarks/recipe_step.py --output benchmarks/results/recipe-step-cpu.json
    python benchmarks/recipe_step.py --smoke --output /tmp/recipe-step.json   # seconds, demo data

Captions, labels and decoder targets are the real ones of the dataset's first rows; the feature maps are random
tensors of the cached maps' shape (their values do not change the cost). Images/s per variant, the ratios to
``packed+loop`` (of the totals, and the median of per-batch ratios) and the load average go to ``--output``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in throughput.py: 2 cores, no spinning threads

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import loadavg, machine_info, median_paired_ratio, ratio  # noqa: E402

from multimodal.annotations import read_annotations  # noqa: E402
from multimodal.config import LossConfig, ModelConfig, save_json  # noqa: E402
from multimodal.data import Collator, ImageCaptionDataset  # noqa: E402
from multimodal.engine import build_optimizer, model_inputs  # noqa: E402
from multimodal.labels import LabelCodec  # noqa: E402
from multimodal.losses import JointLoss  # noqa: E402
from multimodal.model import MultimodalClassifier  # noqa: E402
from multimodal.text import PAD_ID, train_caption_tokenizer  # noqa: E402

VARIANTS = ("packed+loop", "padded+loop", "packed+fused", "padded+fused")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MULTIMODAL_COMP5329", str(ROOT.parent / "shared/comp5329")),
                   help="dataset folder with train.csv; default $MULTIMODAL_COMP5329 or ../shared/comp5329")
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=288)
    p.add_argument("--tail-stages", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="timed batches per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--output", default=None, help="JSON results")
    p.add_argument("--smoke", action="store_true", help="tiny counts on the demo data")
    return p


def make_batches(frame: Any, codec: LabelCodec, tokenizer: Any, map_shape: tuple[int, ...], batch_size: int,
                 n: int) -> list[dict[str, Any]]:
    """``n`` batches of the frame's first rows (cycled), collated as `train.py` collates them, each with random maps."""
    g = torch.Generator().manual_seed(0)
    rows = frame.iloc[[k % len(frame) for k in range(n * batch_size)]]
    loader = DataLoader(ImageCaptionDataset(rows, codec=codec, tokenizer=tokenizer), batch_size=batch_size,
                        collate_fn=Collator(pad_id=PAD_ID))
    return [batch | {"image_features": torch.randn(batch_size, *map_shape, generator=g)} for batch in loader]


def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="mm-recipe-step-"))
    if args.smoke:
        from multimodal.demo import make_demo_dataset
        args.data_dir = str(make_demo_dataset(workdir / "demo", num_train=48, num_test=4, image_size=48))
        args.encoder, args.image_size, args.batch_size, args.batches, args.warmup = "efficientnet_b0", 64, 8, 2, 1
    frame = read_annotations(Path(args.data_dir) / "train.csv")
    codec = LabelCodec.from_labels(frame["Labels"])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    # the recipe's model settings (benchmarks/comp5329.py CPU_RECIPE): word-skip path, dropout 0.4
    config = ModelConfig(num_labels=codec.num_labels, image_encoder=args.encoder, image_size=args.image_size,
                         vocab_size=tokenizer.get_vocab_size(), pad_id=PAD_ID, caption_word_skip=True, dropout=0.4,
                         max_labels=int(frame["Labels"].map(len).max()))
    criterion = JointLoss(LossConfig())
    steps = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = MultimodalClassifier(config, pretrained=False)
        frozen = model.image_encoder.freeze_below_tail(args.tail_stages)
        model.tail_stages = args.tail_stages
        model.train()
        for module in frozen:
            module.eval()
        model.caption_encoder.lstm_impl = variant.split("+")[0]
        optimizer = build_optimizer(model, 1e-3, 5e-4, 0.05)
        for group in optimizer.param_groups:
            group["fused"] = variant.endswith("fused") and group["fused"]

        def step(batch: dict[str, Any], model: torch.nn.Module = model, optimizer: Any = optimizer) -> None:
            outputs = model(**model_inputs(batch), label_seq=batch["label_seq"])
            criterion(outputs, batch["targets"], batch["label_seq"])["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train_one_epoch
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[variant] = step
    with torch.no_grad():  # the shape of the cached maps (any variant's encoder: they are the same)
        probe = model.image_encoder.forward_stem(torch.zeros(1, 3, args.image_size, args.image_size), args.tail_stages)
    batches = make_batches(frame, codec, tokenizer, tuple(probe.shape[1:]), args.batch_size,
                           args.warmup + args.batches)
    per_step: dict[str, list[float]] = {v: [] for v in VARIANTS}
    before = loadavg()
    for i, batch in enumerate(batches):
        for variant in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
            t0 = time.perf_counter()
            steps[variant](batch)
            if i >= args.warmup:
                per_step[variant].append(time.perf_counter() - t0)
    after = loadavg()
    results: dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "args": vars(args),
                               "map_shape": list(probe.shape[1:]), "loadavg_before": before, "loadavg_after": after}
    for variant in VARIANTS:
        seconds = sum(per_step[variant])
        images = args.batch_size * len(per_step[variant])
        results[variant] = {"images_per_s": round(images / seconds, 2), "images": images,
                            "seconds": round(seconds, 3), "step_seconds": [round(t, 4) for t in per_step[variant]]}
        print(f"  {variant:<14s} {images / seconds:8.1f} img/s  ({images} images, {seconds:.2f} s)", flush=True)
    base = results[VARIANTS[0]]
    results["ratios"] = {f"{v}/{VARIANTS[0]}": ratio(results[v], base) for v in VARIANTS[1:]}
    results["ratios"].update({f"{v}/{VARIANTS[0]} (median of per-batch ratios)": median_paired_ratio(results[v], base)
                              for v in VARIANTS[1:]})
    print(f"load {before[0]:.1f}->{after[0]:.1f}; ratios to {VARIANTS[0]}: {results['ratios']}")
    if args.output:
        save_json(results, args.output)
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""An ensemble's prediction speed: one model, and two models read and run apart or sharing what they can.

The CPU recipe of RESULTS.md averages two models trained with different seeds above the same frozen bottom of one
pretrained encoder. `inference.predict_to_csv` (and so `predict.py`) lets such members read one loader's batches (each
JPEG decoded once) and run the encoders' identical bottom once per batch (`inference.shared_stem_stages`); each runs
only its own top stage, heads, caption branch and decoder. This measures, end to end over the same rows (read the
JPEGs, transform, models, write the CSV), in rounds whose order alternates (ABC, CBA) and pooled:

- ``one_model``: the first member alone;
- ``ensemble_shared``: both members, as predict.py runs them;
- ``ensemble_apart``: both members each with its own loader and whole encoder (``share=False``: before the change);

and checks that the shared and the apart ensembles write the same probabilities.

    python benchmarks/ensemble_predict.py --data-dir ../shared/comp5329 \\
        --checkpoint runs/benchmarks/cpu_asl_dec_ens2_all/seed0/model runs/benchmarks/cpu_asl_dec_ens2_all/seed100/model \\
        --output benchmarks/results/ensemble-predict-cpu.json
    python benchmarks/ensemble_predict.py --smoke --output /tmp/ensemble.json     # CI: two tiny models, demo data
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from multimodal.annotations import read_annotations  # noqa: E402
from multimodal.inference import predict_to_csv, shared_stem_stages  # noqa: E402
from multimodal.model import MultimodalClassifier  # noqa: E402
from throughput import machine_info, paired, ratio  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("MULTIMODAL_COMP5329"),
                   help="dataset folder: its test.csv rows (ImageID, Caption) and data/ images are predicted "
                        "(default: $MULTIMODAL_COMP5329)")
    p.add_argument("--checkpoint", nargs="+", action="extend", default=None,
                   help="the ensemble's exported model folders (two or more)")
    p.add_argument("--images", type=int, default=512, help="rows predicted per measurement")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the three measurements, order alternating")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output", default=None, help="JSON file for the results")
    p.add_argument("--smoke", action="store_true",
                   help="two tiny models sharing a frozen bottom, on generated demo data, one round (for CI)")
    return p


def smoke_setup(workdir: Path) -> tuple[Path, list[Path]]:
    """Demo data and two exported members: one random tf_efficientnet_lite0 (32 px), the second with its last stage
    and heads changed, as two fine-tunings above one frozen bottom would leave them."""
    from multimodal.config import ModelConfig
    from multimodal.demo import make_demo_dataset
    from multimodal.labels import LabelCodec
    from multimodal.text import train_caption_tokenizer

    data = make_demo_dataset(workdir / "data", num_train=8, num_test=24, image_size=48)
    frame = read_annotations(data / "train.csv")
    codec = LabelCodec.from_labels(frame["Labels"])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    config = ModelConfig(num_labels=codec.num_labels, image_encoder="tf_efficientnet_lite0", image_size=32,
                         vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    first = MultimodalClassifier(config)
    second = MultimodalClassifier(config)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        for param in (*second.image_encoder.backbone.blocks[-1].parameters(), *second.fused_head.parameters()):
            param.add_(0.1 * torch.randn_like(param))
    dirs = []
    for i, model in enumerate((first, second)):
        dirs.append(model.save_pretrained(workdir / f"member{i}", codec, tokenizer))
    return data, dirs


def prediction_run(models: list[MultimodalClassifier], rows: pd.DataFrame, image_dir: Path, out: Path,
                   args: argparse.Namespace, share: bool) -> tuple[int, float]:
    start = time.perf_counter()
    result = predict_to_csv(models, rows, image_dir, out.with_suffix(".csv"), Accelerator(cpu=True),
                            probabilities=out.with_suffix(".prob.csv"), batch_size=args.batch_size,
                            workers=args.workers, share=share)
    seconds = time.perf_counter() - start
    assert result["rows"] == len(rows)
    return len(rows), seconds


def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ensemble_predict_"))
    if args.smoke:
        data_dir, checkpoints = smoke_setup(workdir)
        args.images, args.rounds, args.batch_size, args.workers = 24, 1, 8, 0
    else:
        if not args.data_dir or not args.checkpoint or len(args.checkpoint) < 2:
            raise SystemExit("give --data-dir (or MULTIMODAL_COMP5329) and two or more --checkpoint folders")
        data_dir, checkpoints = Path(args.data_dir), [Path(c) for c in args.checkpoint]
    models = [MultimodalClassifier.from_pretrained(c) for c in checkpoints]
    rows = read_annotations(data_dir / "test.csv").iloc[: args.images].reset_index(drop=True)
    image_dir = data_dir / "data"
    stem = shared_stem_stages([m.image_encoder for m in models])
    print(f"{len(models)} models; shared bottom: all but the last {stem} stage(s); {len(rows)} rows, "
          f"batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} threads", flush=True)
    # Warm-up (not timed): the first forward passes of every model, and the page cache for the JPEGs.
    prediction_run(models, rows.iloc[: 2 * args.batch_size], image_dir, workdir / "warmup", args, share=False)
    names = ("one_model", "ensemble_shared", "ensemble_apart")
    fns = (lambda: prediction_run(models[:1], rows, image_dir, workdir / "one", args, share=True),
           lambda: prediction_run(models, rows, image_dir, workdir / "shared", args, share=True),
           lambda: prediction_run(models, rows, image_dir, workdir / "apart", args, share=False))
    measured = paired(names, fns, args.rounds)
    shared = pd.read_csv(workdir / "shared.prob.csv").iloc[:, 1:].to_numpy()
    apart = pd.read_csv(workdir / "apart.prob.csv").iloc[:, 1:].to_numpy()
    same_labels = bool((pd.read_csv(workdir / "shared.csv", keep_default_na=False)["Labels"]
                        == pd.read_csv(workdir / "apart.csv", keep_default_na=False)["Labels"]).all())
    results = {
        "benchmark": "ensemble_predict", "machine": machine_info(torch.device("cpu")),
        "command": " ".join(["python", "benchmarks/ensemble_predict.py", *sys.argv[1:]]),
        "checkpoints": [str(c) for c in checkpoints], "rows": len(rows), "batch_size": args.batch_size,
        "workers": args.workers, "shared_stem_stages": stem, "end_to_end": measured,
        "ratios": {"ensemble_shared/one_model": ratio(measured["ensemble_shared"], measured["one_model"]),
                   "ensemble_apart/one_model": ratio(measured["ensemble_apart"], measured["one_model"]),
                   "ensemble_shared/ensemble_apart": ratio(measured["ensemble_shared"], measured["ensemble_apart"])},
        "agreement": {"max_abs_probability_difference": float(np.abs(shared - apart).max()),
                      "same_labels": same_labels},
    }
    for key, value in results["ratios"].items():
        print(f"  {key:<34s} {value:.3f}")
    print(f"  shared vs apart: max |p difference| {results['agreement']['max_abs_probability_difference']:.2e}, "
          f"same labels: {same_labels}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())

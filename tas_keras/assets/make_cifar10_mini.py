"""Cuts the bundled CIFAR-10 subset (cifar10_mini.zip) out of the full CIFAR-10 JPEG zip.

Usage (from the repository root):
    python tas_keras/assets/make_cifar10_mini.py [path/to/cifar10-jpeg.zip]

The source zip holds train/<class>/NNNN.jpg and test/<class>/NNNN.jpg. A seeded sample per class is
copied byte for byte (no re-encoding) into an uncompressed zip with the same layout. Members are
written in sorted order with fixed timestamps and attributes, so re-running gives an identical file.
"""

import pathlib
import random
import sys
import zipfile

PER_CLASS = {"train": 500, "test": 100}
SEED = 0
_HERE = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _HERE.parents[1]
DEFAULT_SOURCE = _REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
OUTPUT = _HERE / "cifar10_mini.zip"
# Zip stores no timezone and no date before 1980; any constant keeps the output reproducible.
_TIMESTAMP = (2019, 3, 31, 0, 0, 0)


def _select(names):
    """Maps (split, class) -> sorted sample of member names."""
    groups = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in PER_CLASS and parts[2].lower().endswith(".jpg"):
            groups.setdefault((parts[0], parts[1]), []).append(name)
    chosen = {}
    for (split, cls), members in sorted(groups.items()):
        # One RNG per group: a class's sample does not depend on which other classes exist.
        rng = random.Random(f"{SEED}/{split}/{cls}")
        chosen[(split, cls)] = sorted(rng.sample(sorted(members), PER_CLASS[split]))
    return chosen


def main():
    source = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE
    with zipfile.ZipFile(source) as src:
        chosen = _select(src.namelist())
        with zipfile.ZipFile(OUTPUT, "w", zipfile.ZIP_STORED) as dst:
            for members in chosen.values():
                for name in members:
                    info = zipfile.ZipInfo(name, _TIMESTAMP)
                    info.create_system = 3  # Unix, whichever OS runs the script.
                    info.external_attr = 0o644 << 16
                    dst.writestr(info, src.read(name))
    counts = {split: sum(len(m) for (s, _), m in chosen.items() if s == split) for split in PER_CLASS}
    num_classes = len({cls for _, cls in chosen})
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes): {num_classes} classes, {counts}")


if __name__ == "__main__":
    main()

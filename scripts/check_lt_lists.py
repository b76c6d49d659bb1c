"""Check real split lists against ltbench's list-file data sets, by hand.

    python scripts/check_lt_lists.py LISTS_DIR [--tree OUT]

Parses every known list file found in LISTS_DIR (ImageNet_LT_*.txt, Places_LT_*.txt,
iNaturalist18_*.txt) with the parser the data sets use, and prints its size, class count,
largest and smallest class, sha256 and any difference from the published figures. With
--tree, it also builds OUT/<data set>/ holding the lists and one small JPEG at every path
they name (hard links to a single file), and runs ``ltbench data check`` on each tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from ltbench.data import DATASETS
from ltbench.datacheck import check
from ltbench.datasets.list_lt import ListLT, parse_list

NAMES = ["imagenet_lt", "places_lt", "inat2018"]
LINKS_PER_FILE = 50_000


def report_lists(lists_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """Print each known list's figures; return the lists found per data set."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for name in NAMES:
        plugin: ListLT = DATASETS.get(name)()
        for split, (file, lines) in plugin.spec.lists.items():
            path = lists_dir / file
            if not path.is_file():
                print(f"{name:<12} {split:<5} {file:<26} not in {lists_dir}")
                continue
            image_list = parse_list(path)
            counts = np.bincount(image_list.labels, minlength=plugin.spec.num_classes)
            present = counts[counts > 0]
            problems = plugin.problems(split, image_list)
            print(
                f"{name:<12} {split:<5} {file:<26} {len(image_list):>7,} lines (release "
                f"{lines:,}), {len(present)} classes, per class {present.max()}..{present.min()}, "
                f"sha256 {image_list.sha256[:16]}: {'; '.join(problems) or 'matches the release'}"
            )
            found.setdefault(name, []).append((file, path))
    return found


def build_tree(out: Path, name: str, lists: list[tuple[str, Path]]) -> Path:
    """OUT/<name> with the lists and a hard link to one small JPEG at every listed path."""
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    image = encode_jpeg(torch.full((3, 40, 48), 128, dtype=torch.uint8)).numpy().tobytes()
    made = 0
    for file, path in lists:
        shutil.copyfile(path, root / file)
        for relative in parse_list(path).paths:
            target = root / relative
            if not target.exists():
                if made % LINKS_PER_FILE == 0:  # file systems cap the links to one file
                    template = root / f"template_{made // LINKS_PER_FILE}.jpg"
                    template.write_bytes(image)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(template, target)
                made += 1
    print(f"{root}: {made:,} images linked")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lists_dir", type=Path)
    parser.add_argument("--tree", type=Path, help="build image trees here and check them")
    args = parser.parse_args()
    found = report_lists(args.lists_dir)
    if not args.tree:
        return
    for name, lists in found.items():
        root = build_tree(args.tree, name, lists)
        print(f"\n$ ltbench data check {name} --root {root}")
        print(check(name, str(root)).text)


if __name__ == "__main__":
    main()

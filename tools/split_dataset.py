"""Split a folder-per-class tree into PaddleClas lists:
python tools/split_dataset.py --root data/flowers [--val 0.2] [--test 0.1] [--seed 0] [--out DIR]

Stratified per class and seeded; exact and near duplicates of a picture always land on the same
side. Writes train_list.txt, val_list.txt (test_list.txt) and label_list.txt; use --root as the
dataset's image_root.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder with one sub-folder per class")
    parser.add_argument("--val", type=float, default=0.2)
    parser.add_argument("--test", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where the lists go (default: --root)")
    args = parser.parse_args(argv)
    from ppcls_ft.data.split import split_folder
    from ppcls_ft.engine.cli import exit_on_user_error
    summary = exit_on_user_error(lambda: split_folder(args.root, args.val, args.test, args.seed, args.out))
    for split in ("train", "val", "test"):
        if split in summary:
            counts = summary[split]
            print(f"{split}: {sum(counts.values())} images  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"{summary['duplicate_groups']} duplicate groups ({summary['images_in_duplicate_groups']} "
          f"images) kept on one side each; lists in {args.out or args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

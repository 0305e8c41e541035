"""Check a dataset before training: python tools/check_dataset.py -c CONFIG [-o ...]

Reads DataLoader.Train and DataLoader.Eval as training does; writes check_dataset.json,
class_histogram.png and image_sizes.png into Global.output_dir; prints the verdict and advice.
Exits 1 only when training could not start (2 for a config or list error).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not

from ppcls_ft.engine.cli import run_cli  # noqa: E402


def check(cfg):
    from ppcls_ft.data.check import check_dataset, write_check
    from ppcls_ft.engine.export import label_names_from_config
    start = time.time()
    report = check_dataset(cfg)
    names = label_names_from_config(cfg, int(cfg["Arch"]["class_num"]))
    path = write_check(report, cfg["Global"].get("output_dir", "./output"), names)
    for split, r in report["splits"].items():
        counts = list(r["class_counts"].values())
        print(f"{split}: {r['samples']} images, {len(counts)} classes ({min(counts)}-{max(counts)} "
              f"per class), {len(r['unreadable'])} unreadable, {len(r['tiny'])} tiny")
    kinds = [d["kind"] for d in report["duplicates"]]
    leaks = sum(d["split_a"] != d["split_b"] for d in report["duplicates"])
    print(f"duplicates: {kinds.count('exact')} exact, {kinds.count('near')} near, {leaks} across "
          f"splits")
    print(f"verdict: {report['verdict']} ({time.time() - start:.1f} s)")
    for a in report["advice"]:
        print(f"  - {a}")
    print(f"written: {path} (+ class_histogram.png, image_sizes.png)")
    return report


def main(argv=None):
    report = run_cli(__doc__.splitlines()[0], check, argv)
    return 1 if report["verdict"] == "cannot train" else 0


if __name__ == "__main__":
    sys.exit(main())

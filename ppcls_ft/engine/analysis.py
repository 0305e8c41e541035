"""Per-class results of an evaluation: confusion matrix, precision/recall/F1, the most confused
pairs and the most confidently wrong images, exact on any number of devices.

``ClassStats`` is filled by ``evaluate(parts, model, stats)`` batch by batch; ``reduce()`` sums
the confusion matrix over ranks (a fixed K x K layout) and gathers each rank's most confident
mistakes on every rank. ``results(names)`` is what ``eval_results.json`` holds:

```json
{"top1": 0.93, "images": 811, "per_class": [{"class_id": 0, "name": "daisy", "precision": ..,
 "recall": .., "f1": .., "support": 126}, ...], "macro_avg": {..}, "weighted_avg": {..},
 "confusion_matrix": [[120, 3, ...], ...], "most_confused": [{"true": .., "predicted": .., "count": ..}],
 "most_confident_wrong": [{"index": .., "path": .., "true": .., "predicted": .., "score": ..}]}
```
Rows of ``confusion_matrix`` are true classes, columns predicted classes.
"""
import json
import os

import numpy as np

from ..utils import distributed as dist

WRONG_KEPT = 24  # confidently wrong images kept per rank for the report's gallery


class ClassStats:
    def __init__(self, class_num):
        self.k = int(class_num)
        self.confusion = np.zeros((self.k, self.k), np.int64)
        self.wrong = []  # (score, dataset index, true, predicted)

    def update(self, probs, labels, indices=None):
        """``probs`` [N, K] (numpy), ``labels`` [N]; ``indices`` the rows' dataset indices (or
        None when unknown, e.g. a batch that lost an unreadable image)."""
        pred = probs.argmax(axis=1)
        labels = np.asarray(labels).reshape(-1)
        np.add.at(self.confusion, (labels, pred), 1)
        if indices is None:
            return
        for row in np.flatnonzero(pred != labels):
            self.wrong.append((float(probs[row, pred[row]]), int(indices[row]), int(labels[row]),
                               int(pred[row])))
        self.wrong = sorted(self.wrong, reverse=True)[:WRONG_KEPT]

    def reduce(self):
        """Sum over ranks; every rank then holds the global matrix and mistakes."""
        if dist.world_size() < 2:
            return self
        self.confusion = np.rint(np.asarray(dist.all_sum(self.confusion.ravel().tolist()))
                                 ).astype(np.int64).reshape(self.k, self.k)
        import paddle.distributed as pdist
        gathered = []
        pdist.all_gather_object(gathered, self.wrong)
        self.wrong = sorted((w for part in gathered for w in part), reverse=True)[:WRONG_KEPT]
        return self

    def per_class(self, names=None):
        cm = self.confusion.astype(np.float64)
        tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, 0.0)
            recall = np.where(support > 0, tp / support, 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return [{"class_id": c, "name": _name(names, c), "precision": float(precision[c]),
                 "recall": float(recall[c]), "f1": float(f1[c]), "support": int(support[c])}
                for c in range(self.k)]

    def most_confused(self, top=5):
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:top]
        return [{"true": int(i // self.k), "predicted": int(i % self.k), "count": int(off.flat[i])}
                for i in order if off.flat[i] > 0]

    def results(self, names=None, paths=None):
        rows = self.per_class(names)
        total = int(self.confusion.sum())
        seen = [r for r in rows if r["support"] > 0]

        def avg(weighted):
            w = np.array([r["support"] if weighted else 1 for r in seen], np.float64)
            return {m: float(np.dot(w, [r[m] for r in seen]) / w.sum()) if len(seen) else 0.0
                    for m in ("precision", "recall", "f1")}

        named = lambda c: {"class_id": c, "name": _name(names, c)}  # noqa: E731
        return {
            "top1": float(np.trace(self.confusion) / total) if total else None, "images": total,
            "per_class": rows, "macro_avg": avg(False), "weighted_avg": avg(True),
            "confusion_matrix": self.confusion.tolist(),
            "most_confused": [{"true": named(p["true"]), "predicted": named(p["predicted"]),
                               "count": p["count"]} for p in self.most_confused()],
            "most_confident_wrong": [
                {"index": i, "path": paths[i] if paths is not None else None,
                 "true": named(t), "predicted": named(p), "score": s}
                for s, i, t, p in self.wrong]}


def _name(names, c):
    return str(names[c]) if names is not None and c < len(names) else str(c)


def dataset_paths(loader):
    """File paths by dataset index of an eval loader's dataset, or None."""
    samples = getattr(getattr(loader, "dataset", None), "samples", None)
    return [str(s[0]) for s in samples] if samples is not None else None


def write_eval_results(out_dir, results):
    """``eval_results.json`` and ``confusion_matrix.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval_results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    png = os.path.join(out_dir, "confusion_matrix.png")
    with open(png, "wb") as f:
        f.write(confusion_png(results))
    return path, png


def confusion_png(results):
    """The confusion matrix as PNG bytes: counts, rows true, columns predicted."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(results["confusion_matrix"])
    names = [r["name"] for r in results["per_class"]]
    k = len(names)
    side = min(2 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if k <= 40:  # tick labels and counts stay legible up to about 40 classes
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        if k <= 25:
            for (i, j), v in np.ndenumerate(cm):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top1 = "n/a" if results["top1"] is None else f"{results['top1']:.3f}"
    ax.set_title(f"confusion matrix\n{int(cm.sum())} images, top-1 {top1}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def format_per_class(results, worst=10):
    """The per-class table for the log, worst recall first (at most ``worst`` rows)."""
    rows = sorted(results["per_class"], key=lambda r: (r["recall"], r["class_id"]))[:worst]
    lines = [f"per class (worst recall first; {len(results['per_class'])} classes): "
             "class_id name precision recall f1 support"]
    lines += [f"  {r['class_id']:>4} {r['name'][:28]:<28} {r['precision']:.3f} {r['recall']:.3f} "
              f"{r['f1']:.3f} {r['support']}" for r in rows]
    for p in results["most_confused"][:3]:
        lines.append(f"  confused: {p['count']} x {p['true']['name']} predicted as {p['predicted']['name']}")
    return "\n".join(lines)

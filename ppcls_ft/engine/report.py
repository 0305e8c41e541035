"""``report.html``: one self-contained page per training run (pictures embedded as PNG data).

What it holds: the loss, top-1 and learning-rate curves of train and val, the diagnosis with
its advice, the per-class table and confusion matrix of the best epoch, and a gallery of the
most confidently wrong val images with their true and predicted labels. Written by rank 0 at the
end of every run (``Trainer.fit``); matplotlib draws, the page needs nothing but a browser.
"""
import base64
import html
import io

import numpy as np

from .analysis import confusion_png

THUMB = 160  # gallery thumbnails: longest side in pixels


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _img(png, alt, width=None):
    w = f' width="{width}"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">')


def curves_png(history):
    """Train/val loss, train/val top-1 and lr against epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, (("loss", ("train_loss", "eval_loss")),
                                        ("top-1", ("train_top1", "eval_top1", "eval_ema_top1")),
                                        ("learning rate (end of epoch)", ("lr",)))):
        for key in keys:
            pts = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _thumbnail(path):
    """A PNG thumbnail of the image at ``path``, or None if it cannot be read."""
    import cv2
    data = np.fromfile(path, np.uint8) if path else None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if img is None:
        return None
    scale = THUMB / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, int(img.shape[1] * scale)), max(1, int(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes() if ok else None


def _table(rows, cols):
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)


def build_report(title, history, verdict, results=None, stopped=None):
    """The page as a string. ``results``: ``ClassStats.results(...)`` of the best epoch."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    best = [r for r in history if r.get("eval_top1") is not None]
    if best:
        top = max(best, key=lambda r: r["eval_top1"])
        parts.append(f"<p>best val top-1 <b>{top['eval_top1']:.4f}</b> at epoch {top['epoch']} "
                     f"of {len(history)} trained.</p>")
    if stopped:
        parts.append(f"<p><b>Stopped early:</b> {html.escape(stopped)}</p>")
    if verdict:
        advice = "".join(f"<li><code>{html.escape(a)}</code></li>" for a in verdict.get("advice", []))
        parts.append(f"<h2>Diagnosis: {html.escape(verdict['verdict'].replace('_', ' '))}</h2>"
                     f"<p>{html.escape(verdict.get('reason', ''))}</p><ul>{advice}</ul>")
    if history:
        parts.append("<h2>Curves</h2>" + _img(curves_png(history), "loss, top-1 and lr curves"))
    if results:
        parts.append(f"<h2>Per class (epoch {results.get('epoch', '?')}, {results['images']} val "
                     f"images, top-1 {results['top1']:.4f})</h2>")
        rows = results["per_class"] + [dict(results["macro_avg"], name="macro average"),
                                       dict(results["weighted_avg"], name="weighted average")]
        parts.append(_table(rows, ["class_id", "name", "precision", "recall", "f1", "support"]))
        if results["most_confused"]:
            pairs = [{"true": p["true"]["name"], "predicted as": p["predicted"]["name"],
                      "images": p["count"]} for p in results["most_confused"]]
            parts.append("<h3>Most confused pairs</h3>" + _table(pairs, ["true", "predicted as", "images"]))
        parts.append("<h2>Confusion matrix</h2>" + _img(confusion_png(results), "confusion matrix"))
        cells = []
        for w in results["most_confident_wrong"]:
            thumb = _thumbnail(w.get("path"))
            caption = (f"true <b>{html.escape(w['true']['name'])}</b><br>predicted "
                       f"<b>{html.escape(w['predicted']['name'])}</b> ({w['score']:.2f})")
            picture = _img(thumb, w.get("path") or "") if thumb else "<i>image not readable</i>"
            cells.append(f'<figure>{picture}<figcaption>{caption}<br><small>'
                         f'{html.escape(str(w.get("path")))}</small></figcaption></figure>')
        if cells:
            parts.append("<h2>Most confidently wrong val images</h2><div class=gallery>"
                         + "".join(cells) + "</div>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "img{max-width:100%;height:auto}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:2px 8px;text-align:right}th{background:#eee}.gallery{display:flex;"
             "flex-wrap:wrap;gap:12px}figure{margin:0;width:180px;font-size:12px}"
             "small{word-break:break-all;color:#666}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def class_results(cfg, stats, loader, epoch=None):
    """``ClassStats`` -> the ``eval_results.json`` dict, with label names and file paths."""
    from .analysis import dataset_paths
    from .export import label_names_from_config
    names = label_names_from_config(cfg, stats.k)
    results = stats.results(names, dataset_paths(loader))
    if epoch is not None:
        results["epoch"] = epoch
    return results


def write_run_report(out_dir, cfg, history, verdict, results=None, stopped=None):
    """``eval_results.json`` + ``confusion_matrix.png`` (when evaluated) and ``report.html``."""
    import os
    from pathlib import Path

    from .analysis import write_eval_results
    if results is not None:
        write_eval_results(out_dir, results)
    title = f"{cfg['Arch']['name']} — {Path(str(out_dir)).name}"
    path = os.path.join(out_dir, "report.html")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(build_report(title, history, verdict, results, stopped))
    os.replace(path + ".tmp", path)
    return path

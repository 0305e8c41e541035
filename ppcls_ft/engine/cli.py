"""Command-line plumbing shared by ``tools/*.py`` and ``deploy/``: ``-c CONFIG -o key=value ...``
and the one error path: a user error prints one line naming the file or key and what to change,
and exits with code 2; anything else is a bug and keeps its traceback."""
import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, DataError, ExportError, WeightsError

# OSError covers a missing file and a folder or file that cannot be created or written.
USER_ERRORS = (ConfigError, DataError, WeightsError, ExportError, OSError)
EXIT_USER_ERROR = 2


def parse_args(description, argv=None, options=None):
    """``-c``/``-o`` plus ``options``: ``{"--flag": argparse keyword arguments}``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="PaddleClas-style YAML config")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="override a key, e.g. -o Global.epochs=5 -o Arch.class_num=10 "
                             "(value parsed as YAML; list items by index: transform_ops.1.X.size=160)")
    for flag, kwargs in (options or {}).items():
        parser.add_argument(flag, **kwargs)
    return parser.parse_args(argv)


def run_cli(description, fn, argv=None, *, options=None, load=None):
    """Load the config from argv and call ``fn(cfg, **options)``, both under ``exit_on_user_error``.

    ``load(path, overrides)`` reads the config (default: the training config loader); the values
    of ``options`` flags are passed to ``fn`` as keyword arguments (``--allow-random`` ->
    ``allow_random``).
    """
    if load is None:
        from ..config import load_config as load
    args = parse_args(description, argv, options)
    cfg = exit_on_user_error(lambda: load(args.config, args.override))
    names = [flag.lstrip("-").replace("-", "_") for flag in options or {}]
    kwargs = {name: getattr(args, name) for name in names}
    return exit_on_user_error(lambda: fn(cfg, **kwargs), cfg)


def exit_on_user_error(call, cfg=None):
    """Return ``call()``; on a user error print ``error: <user_message>`` to stderr and exit 2.

    ``cfg``, when given, lets an OSError name the config key whose path failed.
    """
    try:
        return call()
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc, cfg)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def user_message(exc, cfg=None):
    """The text after ``error:``. Our own errors already name the key or file (a multi-line
    report, such as a list of bad samples, stays as written); an OSError gets its path, the
    config key that holds the path, and what to change."""
    if not isinstance(exc, OSError) or not exc.filename:
        return str(exc)
    path = str(exc.filename)
    key = config_key_for_path(cfg, path)
    where = f"{key}: " if key else ""
    change = f"set {key} to another path" if key else "choose another path"
    blocker = None
    if isinstance(exc, (NotADirectoryError, FileExistsError)):  # mkdir met a file on its way
        blocker = _regular_file_in_the_way(path)
    if blocker is not None:
        return (f"{where}cannot create the folder {path}: {blocker} is a regular file, not a "
                f"folder; {change} or move that file away")
    if isinstance(exc, FileNotFoundError):
        return f"{where}file or folder not found: {path}; {'fix ' + key if key else 'check the path'}"
    if isinstance(exc, PermissionError):
        return f"{where}permission denied for {path}; {change} (one you may read and write)"
    return f"{where}{path}: {exc.strerror or exc}; {change}"


def _regular_file_in_the_way(path):
    """The existing non-folder at ``path`` or above it, if that is why a folder cannot be made."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def config_key_for_path(cfg, path):
    """The dotted key whose value is ``path``, contains it, or lies inside it; the closest wins.

    A folder a tool creates fails at the configured path, at a file inside it, or at a parent
    folder created on the way; closeness (path parts apart) picks that key over a data folder
    that merely contains the failing path.
    """
    target = Path(path).absolute()
    best = None
    for key, value in _string_leaves(cfg or {}):
        configured = Path(value).absolute()
        if not (target == configured or configured in target.parents or target in configured.parents):
            continue
        candidate = (abs(len(configured.parts) - len(target.parts)), key)
        best = min(best, candidate) if best else candidate
    return best[1] if best else None


def _string_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        if isinstance(tree, str) and tree:
            yield prefix, tree
        return
    for k, v in items:
        yield from _string_leaves(v, f"{prefix}.{k}" if prefix else str(k))

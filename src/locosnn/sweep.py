"""Sweeps: ``locosnn bench CONFIG`` runs a grid of cells (train / continual / cost), resumably, and
keeps one tidy table of every finished cell.

Config file (TOML, or YAML with the same structure)
----------------------------------------------------
::

    # where the sweep writes (relative to the current directory; --out overrides)
    out = "runs/sweep-fmnist"

    # TrainConfig settings shared by every cell
    [base]
    dataset = "fashion-mnist"
    limit = 20000
    T = 8
    batch_size = 128
    epochs = 6
    arch = "784-500-500-10"

    # per-rule settings (the tuned lr of each rule, its rule_args). A table name is the *rule
    # label* used in the grids; a table may set `rule` to run another rule under that label.
    [rules.bptt]
    lr = 1e-3
    [rules.loco]
    lr = 3e-4
    rule_args = { variant = "sample", sigma = 0.5 }
    [rules.loco-faithful]
    rule = "loco"
    lr = 1e-3
    rule_args = { variant = "faithful", sigma = 0.5 }

    [[grid]]
    name = "accuracy"             # required, unique; cells live in OUT/cells/<id>/
    kind = "train"                # train (default) | continual | cost
    rule = ["bptt", "loco", "loco-faithful"]   # a list is an axis of the cartesian product
    seed = [0, 1]
    align_every = 20              # a scalar is an override for every cell of this grid

    [[grid]]
    name = "depth"
    rule = ["bptt", "loco"]
    depth = [2, 4, 8]             # shorthand: arch = "784-{width}x{depth}-10"
    width = 256
    epochs = 3
    [grid.rules.loco]             # per-rule settings for this grid only
    lr = 1e-3

    [[grid]]
    name = "tuning"
    rule = "loco"                 # scalar: every cell runs loco (with [rules.loco] merged in)
    rule_args = [{ sigma = 0.05 }, { sigma = 0.5, drop_mean = true }]   # an axis of tables
    lr = [3e-4, 1e-3]

    [[grid]]
    name = "continual"
    kind = "continual"
    rule = ["bptt", "loco"]
    stream = "split"              # keys for locosnn.continual.run_continual
    n_tasks = 5
    replay = [0, 200]

    [[grid]]
    name = "cost"
    kind = "cost"                 # locosnn.cost.measure_cell(settings) -> dict of numbers
    rule = ["bptt", "np", "loco"]
    depth = [2, 4, 8]
    width = 256
    T = [4, 8, 16]

YAML: the same keys, with ``grid:`` a list of mappings (``rules:`` inside a grid mapping for
its per-rule settings).

Rules of the format
~~~~~~~~~~~~~~~~~~~
* Top-level keys: ``out``, ``base``, ``rules``, ``grid`` (a list of at least one block).
  Dashes in keys are read as underscores.
* In a grid block, every key other than ``name``, ``kind`` and ``rules`` is a setting. A list
  value is an axis; the grid's cells are the cartesian product of its axes. To give a setting
  whose value is itself a list, wrap it in a one-element list (``eval = [["aware", "agnostic"]]``).
  ``rule_args`` is a table (override) or a list of tables (axis).
* ``depth`` + ``width`` build ``arch = arch_template.format(depth=..., width=...)``, where
  ``arch_template`` defaults to ``"784-{width}x{depth}-10"`` (``depth`` = number of hidden
  layers, all of size ``width``); set ``arch_template`` (in base, a rule table or a grid) for
  other inputs, e.g. ``"64-{width}x{depth}-10"`` for the synthetic set. A grid cannot set
  both ``arch`` and ``depth``.
* Precedence, lowest first: ``base`` < ``rules.<label>`` < grid scalars < ``grid.rules.<label>``
  < axis values. ``rule_args`` tables are merged key by key along the same order.
* Train cells are checked before anything runs: unknown settings, unknown rules, bad
  ``rule_args`` and bad arch specs fail with one clear error.

Cells
~~~~~
Each cell gets a stable id: a readable prefix (grid name and its axis values) plus an 8-digit
hash of its kind and merged settings (as written, not library defaults), e.g.
``depth_loco_d4_w256-1a2b3c4d``. Its directory ``OUT/cells/<id>/`` holds ``cell.json``
(the spec), the run's own files (train: ``config.json``, ``metrics.jsonl``,
``checkpoint.pt``; continual: ``results.csv``, ``matrix.json``; cost: ``cost.json``) and,
written atomically last, ``result.json``. A cell with ``result.json`` is finished and never
rerun; an interrupted cell is resumed from its checkpoint (train and continual). A cell with no
directory here whose rows are in ``OUT/results.csv`` is *recorded* (the cell directories are
working files, not committed: a fresh clone has only the aggregate table): it counts as finished
and its rows are kept, unless ``fresh=True`` (``--fresh``) reruns it, replacing its rows when it
finishes. A diverged
train run (non-finite loss) is a finished result with status ``diverged``; a cell that raised
writes ``error.json`` instead and is retried on the next run.

Outputs
~~~~~~~
``OUT/results.csv``: one tidy table, rebuilt atomically from every finished cell of the config
after each cell finishes: train cells one row per epoch, continual cells one row per
(after_task, eval_task, mode), cost cells one row per cell; the settings of each cell are
columns (grid, cell, kind, rule_name = the label, rule, arch, depth, width, T, seed, lr, ...,
config_id = the hash without the seed and align_every, params = the cell's axis values). ``OUT/meta.json``:
command line, config text, git SHA, versions, machine, start and end times of every run.
``OUT/log.jsonl``: one line per executed cell.

Engines: ``--engine local`` (default) runs ``--workers`` processes (``spawn`` context, one
torch thread each unless ``--threads``); ``--workers 0`` runs cells in this process.
``--engine ray`` submits each cell as a Ray task with ``num_cpus=--threads`` (to a cluster
with ``--address``, else a local instance; on a cluster, OUT must be on a shared file system
and locosnn installed on every node). Both engines run the same function, :func:`run_cell`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
import uuid
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .checkpoint import DirLock, atomic_write_bytes, atomic_write_json
from .config import TrainConfig, read_config_text
from .errors import LocosnnError, NonFiniteError, interrupt_exit_code
from .network import arch_depth_width

KINDS = ("train", "continual", "cost")
DEFAULT_ARCH_TEMPLATE = "784-{width}x{depth}-10"
TOP_KEYS = ("out", "base", "rules", "grid")
ABBREV = {"seed": "s", "depth": "d", "width": "w", "epochs": "e", "limit": "n"}
#: the first columns of results.csv, in this order; the rest follow in first-seen order
FIRST_COLUMNS = ["grid", "cell", "kind", "rule_name", "status", "rule", "arch", "depth", "width", "T", "seed", "lr",
                 "epochs", "epoch", "train_loss", "train_acc", "val_acc", "test_acc"]
FINISHED = "result.json"
# keys that do not change what a cell learns: cells that differ only in these share a config_id
# (the report averages over them): the seed, and how often alignment to BPTT is logged
SAME_SETTING = ("seed", "align_every")


@dataclass
class Cell:
    """One point of a grid: ``settings`` go to the runner of ``kind``."""

    id: str
    grid: str
    kind: str
    rule_name: str
    settings: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # the axis values of this cell
    depth: Optional[int] = None
    width: Optional[int] = None
    config_id: str = ""  # hash of the settings without SAME_SETTING keys: cells that differ only in seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Sweep:
    path: Optional[Path]
    text: str
    out: Optional[Path]
    cells: list[Cell]
    grids: list[str]


# -- config ------------------------------------------------------------------------------------------
def _norm(d: Any, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise LocosnnError(f"sweep config: {where} must be a table of settings, got {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def parse_config_text(text: str, suffix: str, name: str = "config") -> dict[str, Any]:
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise LocosnnError(f"sweep config {name}: use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise LocosnnError(f"sweep config {name} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LocosnnError(f"sweep config {name} must hold a table (out, base, rules, [[grid]])")
    return data


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and expand a sweep config file (see the module docstring)."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml") and path.exists():
        raise LocosnnError(f"sweep config {path}: use .toml, .yaml or .yml")
    text = read_config_text(path, "sweep config")
    data = parse_config_text(text, path.suffix, str(path))
    return build_sweep(data, text=text, path=path, out=out)


def build_sweep(data: dict[str, Any], text: str = "", path: Path | None = None, out: str | Path | None = None) -> Sweep:
    data = _norm(data, "the top level")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise LocosnnError(f"sweep config: unknown top-level key(s) {', '.join(unknown)}; "
                           f"use {', '.join(TOP_KEYS)} (TrainConfig settings go in [base])")
    grids = data.get("grid")
    if isinstance(grids, dict):
        raise LocosnnError("sweep config: write each grid as [[grid]] (an array of tables), not [grid]")
    if not grids or not isinstance(grids, list):
        raise LocosnnError("sweep config: no grid; add at least one [[grid]] block with a name")
    base = _norm(data.get("base"), "[base]")
    rules = _rule_tables(data.get("rules"), "[rules")
    cells: list[Cell] = []
    names: list[str] = []
    for gi, block in enumerate(grids):
        block = _norm(block, f"grid #{gi + 1}")
        name = block.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise LocosnnError(f"sweep config: grid #{gi + 1} needs a name of letters, digits, '_', '.', '-' "
                               f"(got {name!r})")
        if name in names:
            raise LocosnnError(f"sweep config: two grids are named {name!r}")
        names.append(name)
        cells += expand_grid(name, block, base, rules)
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LocosnnError(f"sweep config: duplicate cells {', '.join(dup)} (an axis lists the same value twice?)")
    out_dir = Path(out) if out else (Path(data["out"]) if data.get("out") else None)
    return Sweep(path=path, text=text, out=out_dir, cells=cells, grids=names)


def _rule_tables(d: Any, where: str) -> dict[str, dict[str, Any]]:
    """{label: settings}; labels are kept as written (``loco-faithful`` is not ``loco_faithful``)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise LocosnnError(f"sweep config: {where}] must be a table of rule labels")
    return {str(k): _norm(v, f"{where}.{k}]") for k, v in d.items()}


def _layer(into: dict[str, Any], d: dict[str, Any]) -> None:
    for k, v in d.items():
        if k == "rule":
            continue
        if k == "rule_args":
            into["rule_args"] = {**into.get("rule_args", {}), **v}
        else:
            into[k] = v


def _check_rule_args(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise LocosnnError(f"sweep config: {where}: rule_args must be a table (or, as an axis, a list of tables), "
                           f"got {v!r}")
    return {str(k): x for k, x in v.items()}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "default"
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt(x) for x in v)
    return str(v)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _coerce(settings: dict[str, Any]) -> None:
    """YAML reads 1e-3 as a string: turn numeric strings into numbers for float TrainConfig fields."""
    for f in dataclasses.fields(TrainConfig):
        v = settings.get(f.name)
        if isinstance(v, str) and "float" in str(f.type):
            try:
                settings[f.name] = float(v)
            except ValueError:
                pass


def expand_grid(name: str, block: dict[str, Any], base: dict[str, Any], rules: dict[str, dict]) -> list[Cell]:
    """The cells of one grid block: the cartesian product of its list-valued settings."""
    block = dict(block)
    block.pop("name")
    kind = block.pop("kind", "train")
    if kind not in KINDS:
        raise LocosnnError(f"sweep config: grid {name!r}: unknown kind {kind!r}; choose {', '.join(KINDS)}")
    grid_rules = _rule_tables(block.pop("rules", None), f"grid {name!r} [rules")
    if "arch" in block and "depth" in block:
        raise LocosnnError(f"sweep config: grid {name!r} sets both arch and depth; use one (depth + width build "
                           f"the arch)")
    axes: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    for k, v in block.items():
        if isinstance(v, list):
            if not v:
                raise LocosnnError(f"sweep config: grid {name!r}: axis {k!r} is an empty list")
            if k == "rule_args":
                v = [_check_rule_args(x, f"grid {name!r}") for x in v]
            axes[k] = v
        else:
            if k == "rule_args":
                v = _check_rule_args(v, f"grid {name!r}")
            fixed[k] = v
    if "rule_args" in base:
        _check_rule_args(base["rule_args"], "[base]")
    cells = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        label = str(point.get("rule", fixed.get("rule", base.get("rule", "bptt"))))
        rule_tab, grid_rule_tab = rules.get(label, {}), grid_rules.get(label, {})
        for tab, where in ((rule_tab, f"[rules.{label}]"), (grid_rule_tab, f"grid {name!r} rules.{label}")):
            if "rule_args" in tab:
                _check_rule_args(tab["rule_args"], where)
        s: dict[str, Any] = {}
        for layer in (base, rule_tab, fixed, grid_rule_tab, point):
            _layer(s, layer)
        s["rule"] = str(grid_rule_tab.get("rule", rule_tab.get("rule", label)))
        depth, width = s.pop("depth", None), s.pop("width", None)
        template = s.pop("arch_template", DEFAULT_ARCH_TEMPLATE)
        if depth is not None or width is not None:
            if depth is None or width is None:
                raise LocosnnError(f"sweep config: grid {name!r}: depth and width go together "
                                   f"(got depth={depth!r}, width={width!r})")
            try:
                s["arch"] = str(template).format(depth=int(depth), width=int(width))
            except (KeyError, IndexError, ValueError) as e:
                raise LocosnnError(f"sweep config: grid {name!r}: bad arch_template {template!r} ({e}); "
                                   "use {depth} and {width}, e.g. 784-{width}x{depth}-10") from None
        _coerce(s)
        s = {k: s[k] for k in sorted(s)}
        digest = _hash({"kind": kind, "settings": s})
        prefix = "_".join([name] + [(_fmt(v) if k == "rule" else
                                     ("args-" + _fmt(v) if k == "rule_args" else f"{ABBREV.get(k, k)}{_fmt(v)}"))
                                    for k, v in point.items()])
        prefix = re.sub(r"[^A-Za-z0-9._=,+-]", "_", prefix)[:80]
        cell = Cell(id=f"{prefix}-{digest}", grid=name, kind=kind, rule_name=label, settings=s, params=point,
                    depth=int(depth) if depth is not None else None, width=int(width) if width is not None else None,
                    config_id=_hash({"kind": kind, "settings": {k: v for k, v in s.items() if k not in SAME_SETTING},
                                     "label": label}))
        validate_cell(cell)
        cells.append(cell)
    return cells


def validate_cell(cell: Cell) -> None:
    """Fail before anything runs: unknown TrainConfig keys (train cells), rules, rule_args, arch specs."""
    from .network import parse_arch
    from .rules import make_rule

    where = f"sweep config: grid {cell.grid!r} cell {cell.id}"
    s = cell.settings
    try:
        if cell.kind == "train":
            cfg = TrainConfig.from_dict(s).validate()
        else:
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            cfg = TrainConfig.from_dict({k: v for k, v in s.items() if k in known})
        parse_arch(cfg.arch)
        make_rule(cfg.rule, loss=cfg.loss, seed=cfg.seed, **cfg.rule_args)
    except LocosnnError as e:
        raise LocosnnError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise LocosnnError(f"{where}: {e}") from None


# -- running one cell (the same function for every engine) --------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch / numpy
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _run_kind(cell: dict[str, Any], d: Path) -> dict[str, Any]:
    kind, settings = cell["kind"], dict(cell["settings"])
    if kind == "train":
        from .train import Trainer
        hist = Trainer(TrainConfig.from_dict(settings), out=d, resume=True, progress=False).fit()
        return dict(hist[-1]) if hist else {}
    if kind == "continual":
        try:
            from .continual import run_continual
        except ImportError as e:
            raise LocosnnError(f"continual cells need locosnn.continual.run_continual ({e})") from None
        return run_continual(settings, out=d, resume=True, progress=False) or {}
    if kind == "cost":
        try:
            from .cost import measure_cell
        except ImportError as e:
            raise LocosnnError(f"cost cells need locosnn.cost.measure_cell ({e})") from None
        res = measure_cell(settings) or {}
        atomic_write_json(d / "cost.json", _jsonable(res))
        return res
    raise LocosnnError(f"unknown cell kind {kind!r}")


def run_cell(task: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in this process and write its ``result.json`` (or ``error.json``).

    ``task``: ``dir`` (the cell directory), ``cell`` (:meth:`Cell.to_dict`), ``threads`` and
    ``command`` (the sweep command line, kept in ``result.json`` and the table's ``command`` column).
    Never raises for a failing cell: returns ``{"cell", "status", "wall_s", ...}``."""
    import torch

    torch.set_num_threads(int(task.get("threads", 1)))
    d = Path(task["dir"])
    cell = task["cell"]
    d.mkdir(parents=True, exist_ok=True)
    if (d / FINISHED).exists():
        return {"cell": cell["id"], "status": "skipped", "wall_s": 0.0, "pid": os.getpid()}
    spec = d / "cell.json"
    if not spec.exists():
        atomic_write_json(spec, cell)
    if (d / "error.json").exists():
        (d / "error.json").unlink()
    t0, started = time.perf_counter(), _now()
    try:
        summary, status, err = _run_kind(cell, d), "ok", None
    except NonFiniteError as e:  # a diverged run is a result, not a failure of the sweep
        summary, status, err = {}, "diverged", str(e)
    except BaseException as e:  # noqa: BLE001 - a failing cell must not take the sweep down
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = f"{type(e).__name__}: {e}"
        atomic_write_json(d / "error.json", {"cell": cell["id"], "error": msg, "traceback": traceback.format_exc(),
                                             "started": started, "failed": _now(), "pid": os.getpid()})
        return {"cell": cell["id"], "status": "error", "error": msg, "wall_s": time.perf_counter() - t0,
                "pid": os.getpid()}
    from .provenance import git_sha
    res = {"cell": cell["id"], "grid": cell["grid"], "kind": cell["kind"], "status": status, "error": err,
           "started": started, "finished": _now(), "wall_s": time.perf_counter() - t0, "git_sha": git_sha(),
           "command": task.get("command"), "pid": os.getpid(), "threads": int(task.get("threads", 1)),
           "summary": _jsonable(summary)}
    atomic_write_json(d / FINISHED, res)  # last: its presence means "finished"
    return {k: res[k] for k in ("cell", "status", "error", "wall_s", "pid")} | {"summary": res["summary"]}


# -- the tidy table ---------------------------------------------------------------------------------
def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.id


def _cell_columns(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    full = {**TrainConfig().to_dict(), **cell.settings}
    depth, width = cell.depth, cell.width
    if depth is None:
        depth, width = arch_depth_width(full.get("arch", ""))
    return {"grid": cell.grid, "cell": cell.id, "kind": cell.kind, "rule_name": cell.rule_name,
            "status": result.get("status", ""), **full, "depth": depth, "width": width,
            "config_id": cell.config_id, "params": json.dumps(cell.params, sort_keys=True, default=str),
            "git_sha": result.get("git_sha", ""), "command": result.get("command") or "",
            "wall_s": result.get("wall_s")}


def _matrix_rows(R: Any) -> list[dict[str, Any]]:
    """Tidy rows from run_continual's "R": {mode: matrix} or one matrix (mode "default")."""
    mats = R if isinstance(R, dict) else {"default": R}
    rows = []
    for mode, m in mats.items():
        for i, row in enumerate(m or []):
            for j, acc in enumerate(row):
                rows.append({"after_task": i, "eval_task": j, "mode": mode, "acc": acc})
    return rows


def cell_rows(out: Path, cell: Cell) -> list[dict[str, Any]]:
    """The rows of one finished cell in results.csv (empty if the cell is not finished)."""
    d = _cell_dir(out, cell)
    if not (d / FINISHED).exists():
        return []
    result = json.loads((d / FINISHED).read_text())
    cols = _cell_columns(cell, result)
    rows: list[dict[str, Any]] = []
    if cell.kind == "train":
        mp = d / "metrics.jsonl"
        hist = [json.loads(x) for x in mp.read_text().splitlines() if x.strip()] if mp.exists() else []
        rows = [{**cols, **h} for h in hist]
    elif cell.kind == "continual":
        rp = d / "results.csv"
        if rp.exists():
            with rp.open(newline="") as f:
                rows = [{**cols, **r} for r in csv.DictReader(f)]
        else:
            rows = [{**cols, **r} for r in _matrix_rows(result.get("summary", {}).get("R"))]
    else:
        meas = result.get("summary", {}) or {}
        rows = [{**cols, **{(f"cost_{k}" if k in cols else k): v for k, v in meas.items()}}]
    return rows or [cols]


def _cellvalue(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return v


def recorded_rows(out: Path) -> dict[str, list[dict[str, str]]]:
    """The rows of ``out/results.csv`` by cell id (empty if there is no table yet)."""
    path = out / "results.csv"
    rec: dict[str, list[dict[str, str]]] = {}
    if path.exists():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if r.get("cell"):
                    rec.setdefault(r["cell"], []).append(r)
    return rec


def write_results(out: Path, cells: Iterable[Cell], cache: Optional[dict[str, Any]] = None) -> int:
    """Rebuild ``out/results.csv`` atomically from the finished cells, keeping the recorded rows of cells
    that have no finished directory here (see *recorded* in the module docstring); returns the number of rows.

    ``cache`` (a dict the caller keeps for one sweep run, which holds the directory's lock): the recorded rows
    are read once and a finished cell's rows once (a finished cell never changes), so a sweep that rewrites
    the file after every cell reads one new cell directory each time instead of all of them."""
    if cache is None:
        recorded, done = recorded_rows(out), {}
    else:
        if "recorded" not in cache:
            cache["recorded"] = recorded_rows(out)
        recorded, done = cache["recorded"], cache.setdefault("finished", {})
    rows: list[dict[str, Any]] = []
    for c in cells:
        got = done.get(c.id)
        if got is None:
            got = cell_rows(out, c)
            if got and cache is not None:
                done[c.id] = got
        rows += got or recorded.get(c.id, [])
    cols: list[str] = []
    seen: set[str] = set()
    present = {k for r in rows for k in r}
    for k in FIRST_COLUMNS + [k for r in rows for k in r]:
        if k in present and k not in seen:
            seen.add(k)
            cols.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cellvalue(r.get(k)) for k in cols})
    data = buf.getvalue().encode()
    atomic_write_bytes(out / "results.csv", lambda f: f.write(data))
    return len(rows)


# -- status, engines, the sweep ----------------------------------------------------------------------
def cell_status(out: Path, cell: Cell, recorded: Optional[dict[str, Any]] = None) -> str:
    """finished | recorded (rows in results.csv, no finished directory here) | error | partial | pending."""
    d = _cell_dir(out, cell)
    if (d / FINISHED).exists():
        return "finished"
    if recorded is not None and cell.id in recorded and not d.exists():  # a directory here: resume it
        return "recorded"
    if (d / "error.json").exists():
        return "error"
    if (d / "checkpoint.pt").exists() or (d / "metrics.jsonl").exists():
        n = len((d / "metrics.jsonl").read_text().splitlines()) if (d / "metrics.jsonl").exists() else 0
        return f"partial ({n} epoch{'s' if n != 1 else ''})"
    if d.exists() and any(p.name != "cell.json" for p in d.iterdir()):
        return "partial"
    return "pending"


_IN_CELL = False  # in a worker process: is a cell running?
_STOPPING = False  # in a worker process: has a signal asked it to stop?


def _worker_signal(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM in a worker: unwind the running cell (atomic writes remove their temporary files;
    the cell's checkpoint is the last finished epoch) and exit; an idle worker exits at once. Later signals
    (Ctrl-C reaches the worker, then the parent's SIGTERM) do not interrupt that clean-up."""
    global _STOPPING
    if _STOPPING:
        return
    _STOPPING = True
    if _IN_CELL:
        raise KeyboardInterrupt
    os._exit(128 + signum)


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, _worker_signal)
    signal.signal(signal.SIGTERM, _worker_signal)


def _run_cell_in_worker(task: dict[str, Any]) -> dict[str, Any]:
    global _IN_CELL
    _IN_CELL = True
    try:
        return run_cell(task)
    except KeyboardInterrupt:
        os._exit(130)  # the pool must not hand this worker another cell
    finally:
        _IN_CELL = False


def _stop_workers(ex: Any, grace_s: float = 2.0) -> None:
    """Stop a process pool now: cancel what has not started, SIGTERM the workers, SIGKILL any that are still
    alive after ``grace_s`` seconds."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _engine_local(tasks: list[dict], workers: int, on_done) -> None:
    if workers <= 0:
        for t in tasks:
            on_done(t, run_cell(t))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ex = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init)
    try:
        futs = {ex.submit(_run_cell_in_worker, t): t for t in tasks}
        for f in as_completed(futs):
            t = futs[f]
            try:
                res = f.result()
            except BrokenProcessPool as e:
                res = {"cell": t["cell"]["id"], "status": "error", "error": f"worker died: {e}", "wall_s": None}
            on_done(t, res)
    except BaseException:  # Ctrl-C, SIGTERM (the CLI turns it into KeyboardInterrupt), an error in on_done
        _stop_workers(ex)
        _remove_temp_files(tasks)
        raise
    ex.shutdown(wait=True)


def _remove_temp_files(tasks: list[dict]) -> None:
    """After the workers are gone: remove the temporary files of atomic writes that a worker killed in the
    middle of one (past its grace period, e.g. on a loaded machine) left in its cell directory."""
    for t in tasks:
        d = Path(t["dir"])
        if d.is_dir():
            for tmp in d.rglob("*.tmp"):
                try:
                    tmp.unlink()
                except OSError:
                    pass


def _engine_ray(tasks: list[dict], threads: int, address: Optional[str], workers: Optional[int], on_done) -> None:
    try:
        import ray
    except ImportError:
        raise LocosnnError("--engine ray needs ray: pip install 'locosnn[dist]' (or pip install ray)") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=(workers * threads) if workers else None, **kw)
        started = True
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(run_cell)
        refs = {remote.remote(t): t for t in tasks}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            t = refs[done[0]]
            try:
                res = ray.get(done[0])
            except Exception as e:  # a crashed worker: the cell is retried next time
                res = {"cell": t["cell"]["id"], "status": "error", "error": f"{type(e).__name__}: {e}"}
            on_done(t, res)
    finally:
        if started:
            ray.shutdown()


def _write_meta(out: Path, sweep: Sweep, run: dict[str, Any]) -> None:
    from .provenance import git_sha, machine, versions
    path = out / "meta.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        old = {}
    runs = [r for r in old.get("runs", []) if r.get("id", r.get("started")) != run["id"]] + [run]
    meta = {"command": run["command"], "config_path": str(sweep.path) if sweep.path else None,
            "config_text": sweep.text, "git_sha": git_sha(), "versions": versions(), "machine": machine(),
            "started": run["started"], "finished": run.get("finished"), "grids": sweep.grids,
            "n_cells": len(sweep.cells), "runs": runs}
    atomic_write_json(path, meta)


def run_sweep(config: str | Path | Sweep, out: str | Path | None = None, workers: Optional[int] = 1, threads: int = 1,
              engine: str = "local", address: Optional[str] = None, only: Optional[list[str]] = None,
              dry_run: bool = False, command: Optional[str] = None, echo=print, fresh: bool = False) -> dict[str, Any]:
    """Run (or with ``dry_run`` list) the unfinished cells of a sweep (with ``fresh``, also the cells recorded
    only in results.csv). Returns a summary:
    ``{"out", "cells", "finished_before", "ran", "errors"}`` (lists of cell ids)."""
    sweep = config if isinstance(config, Sweep) else load_sweep(config, out)
    if out:
        sweep.out = Path(out)
    if sweep.out is None:
        raise LocosnnError("sweep config sets no `out` directory; add out = \"runs/NAME\" or pass --out")
    outp = sweep.out.resolve()
    if threads < 1:
        raise LocosnnError(f"--threads must be >= 1, got {threads}")
    if workers is None:
        workers = 0 if engine == "ray" else 1
    if workers < 0:
        raise LocosnnError(f"--workers must be >= 0, got {workers}")
    if engine not in ("local", "ray"):
        raise LocosnnError(f"unknown engine {engine!r}; choose local or ray")
    selected = sweep.cells
    if only:
        bad = sorted(set(only) - set(sweep.grids))
        if bad:
            raise LocosnnError(f"--only {', '.join(bad)}: no such grid; the config has {', '.join(sweep.grids)}")
        selected = [c for c in sweep.cells if c.grid in only]
    if dry_run:
        return _run_selected(sweep, outp, selected, workers, threads, engine, address, only, True, command, echo,
                             fresh)
    if outp.exists() and not outp.is_dir():
        raise LocosnnError(f"--out {outp} is an existing file, not a directory; choose another --out")
    with DirLock(outp, "bench"):  # one `locosnn bench` per output directory at a time
        return _run_selected(sweep, outp, selected, workers, threads, engine, address, only, False, command, echo,
                             fresh)


def _run_selected(sweep: Sweep, outp: Path, selected: list[Cell], workers: int, threads: int, engine: str,
                  address: Optional[str], only: Optional[list[str]], dry_run: bool, command: Optional[str],
                  echo, fresh: bool = False) -> dict[str, Any]:
    recorded = recorded_rows(outp)
    status = {c.id: cell_status(outp, c, recorded) for c in selected}
    done = ("finished",) if fresh else ("finished", "recorded")
    done_before = [c.id for c in selected if status[c.id] in done]
    todo = [c for c in selected if status[c.id] not in done]
    summary: dict[str, Any] = {"out": str(outp), "cells": [c.id for c in selected], "finished_before": done_before,
                               "ran": [], "errors": []}
    if dry_run:
        w = max([len(c.id) for c in selected] + [4])
        echo(f"{'status':<20} {'kind':<9} {'cell':<{w}}  settings")
        for c in selected:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in c.params.items())
            echo(f"{status[c.id]:<20} {c.kind:<9} {c.id:<{w}}  {extra}")
        n_rec = sum(status[c.id] == "recorded" for c in selected)
        rec = f" ({n_rec} recorded in results.csv)" if n_rec else ""
        echo(f"{len(selected)} cells in {outp}: {len(done_before)} finished{rec}, {len(todo)} to run")
        return summary
    outp.mkdir(parents=True, exist_ok=True)
    run = {"id": uuid.uuid4().hex[:12], "command": command or "locosnn bench " + " ".join(sys.argv[1:]),
           "started": _now(), "finished": None,
           "engine": engine, "workers": workers, "threads": threads, "only": only, "to_run": len(todo)}
    _write_meta(outp, sweep, run)
    results_cache: dict[str, Any] = {}  # this run holds the directory's lock: finished cells' rows read once
    write_results(outp, sweep.cells, results_cache)
    par = (f"{workers} worker{'s' if workers != 1 else ''}" if engine == "local" and workers else
           "in this process" if engine == "local" else f"{workers * threads if workers else 'all'} Ray CPUs")
    echo(f"{len(selected)} cells: {len(done_before)} finished already, running {len(todo)} "
         f"({engine}, {par}, {threads} torch thread{'s' if threads != 1 else ''} per cell)")
    counter = {"n": 0}

    def on_done(task: dict, res: dict) -> None:
        counter["n"] += 1
        cid = task["cell"]["id"]
        summary["ran"].append(cid)
        if res.get("status") == "error":
            summary["errors"].append(cid)
        with (outp / "log.jsonl").open("a") as f:
            f.write(json.dumps({"time": _now(), "cell": cid, "status": res.get("status"), "error": res.get("error"),
                                "wall_s": res.get("wall_s"), "pid": res.get("pid")}) + "\n")
        write_results(outp, sweep.cells, results_cache)
        s = res.get("summary") or {}
        acc = f" test_acc {s['test_acc']:.4f}" if isinstance(s.get("test_acc"), (int, float)) else ""
        err = f": {res.get('error')}" if res.get("error") else ""
        wall = f" ({res['wall_s']:.1f}s)" if isinstance(res.get("wall_s"), (int, float)) else ""
        echo(f"[{counter['n']}/{len(todo)}] {cid}: {res.get('status')}{acc}{wall}{err}")

    n_cost = sum(c.kind == "cost" for c in todo)
    if n_cost and (engine == "ray" or workers > 1) and len(todo) > 1:
        echo(f"note: {n_cost} cost cell(s) time their steps while other cells run beside them; for clean "
             "timings run the cost grids alone: --workers 1 --only <cost grids>")
    tasks = [{"dir": str(_cell_dir(outp, c)), "cell": c.to_dict(), "threads": threads, "command": run["command"]}
             for c in todo]
    try:
        if tasks:
            if engine == "ray":
                _engine_ray(tasks, threads, address, workers, on_done)
            else:
                _engine_local(tasks, workers, on_done)
    finally:
        run["finished"] = _now()
        run["ran"], run["errors"] = len(summary["ran"]), len(summary["errors"])
        _write_meta(outp, sweep, run)
    write_results(outp, sweep.cells, results_cache)
    echo(f"done: {outp}/results.csv ({len(summary['ran']) - len(summary['errors'])} ran, "
         f"{len(summary['errors'])} failed, {len(done_before)} finished before)")
    return summary


# -- the command line ---------------------------------------------------------------------------------
BENCH_EPILOG = """config format (TOML; YAML with the same keys works too):
  out = "runs/sweep"                      # output directory
  [base]                                  # TrainConfig settings of every cell
  dataset = "fashion-mnist"
  epochs = 6
  [rules.loco]                            # per-rule settings (tuned lr, rule_args)
  lr = 3e-4
  [[grid]]                                # one block per grid
  name = "depth"
  kind = "train"                          # train | continual | cost
  rule = ["bptt", "loco"]                 # lists are axes (cartesian product)
  depth = [2, 4, 8]                       # with width: arch = 784-{width}x{depth}-10
  width = 256
See `python -c "import locosnn.sweep; help(locosnn.sweep)"` for the full format.

examples:
  locosnn bench sweep.toml --dry-run       # list the cells and which are finished
  locosnn bench sweep.toml --workers 2     # run the unfinished cells, two at a time
  locosnn bench sweep.toml --only depth    # one grid
  locosnn bench sweep.toml --engine ray --address auto
  locosnn report runs/sweep                # figures and tables from results.csv
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a resumable sweep of training / continual / cost cells",
                       description="Run every cell of the grids in CONFIG that is not finished yet. Each cell "
                                   "writes into OUT/cells/<id>/; OUT/results.csv (one tidy table of all finished "
                                   "cells) and OUT/meta.json (command, config, git SHA, versions, machine) are kept "
                                   "up to date. Rerunning skips finished cells and resumes interrupted ones. "
                                   "A cell whose rows are in OUT/results.csv but that has no directory here (a "
                                   "fresh clone: only the aggregate table is committed) counts as finished; "
                                   "--fresh reruns those.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="sweep config file (.toml, .yaml or .yml)")
    p.add_argument("--out", help="output directory (default: the config's `out`)")
    p.add_argument("--workers", type=int, default=None,
                   help="cells run in parallel (local engine: worker processes, default one per "
                        "--threads CPUs of this machine; 0 = in this process; ray engine: CPUs of the local Ray "
                        "instance = workers x threads, default all). Cost cells time themselves: run them "
                        "alone (--workers 1) for clean timings")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell (ray: num_cpus per task) (default 1)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local processes (default) or Ray tasks")
    p.add_argument("--address", help="Ray cluster address (e.g. auto or ray://host:10001); default: a local instance")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="list the cells with their status (finished / recorded / partial / pending / error) and "
                        "run nothing")
    p.add_argument("--fresh", action="store_true",
                   help="also rerun the cells recorded only in OUT/results.csv (no cell directory here), e.g. to "
                        "regenerate a committed benchmark on this machine; their rows are replaced as they finish")
    p.add_argument("--only", action="append", metavar="GRIDNAME",
                   help="run only this grid (repeatable, or comma-separated)")
    p.set_defaults(func=cmd_bench)


def _command_line(args: argparse.Namespace, only: Optional[list[str]]) -> str:
    parts = ["locosnn", "bench", str(args.config)]
    for flag, v in (("--out", args.out), ("--workers", args.workers), ("--address", args.address)):
        if v is not None:
            parts += [flag, str(v)]
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    if args.engine != "local":
        parts += ["--engine", args.engine]
    if only:
        parts += ["--only", ",".join(only)]
    if args.fresh:
        parts.append("--fresh")
    return " ".join(parts)


def cmd_bench(args: argparse.Namespace) -> int:
    only = [g for item in (args.only or []) for g in item.split(",") if g] or None
    if args.workers is not None:
        workers = args.workers
    else:
        workers = 0 if args.engine == "ray" else max(1, (os.cpu_count() or 1) // max(1, args.threads))
    try:
        res = run_sweep(args.config, out=args.out, workers=workers, threads=args.threads, engine=args.engine,
                        address=args.address, only=only, dry_run=args.dry_run, command=_command_line(args, only),
                        fresh=args.fresh)
    except KeyboardInterrupt as e:
        print("interrupted: the workers are stopped; finished cells are kept; rerun the same command to resume "
              "the others", file=sys.stderr)
        return interrupt_exit_code(e)
    return 1 if res["errors"] else 0

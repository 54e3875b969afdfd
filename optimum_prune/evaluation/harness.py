"""Zero-shot tasks through EleutherAI's lm-evaluation-harness, the harness the papers and the Open LLM
Leaderboard use (``pip install "optimum-prune[eval]"``).

Task names are lm-eval's own (``hellaswag``, ``arc_easy``, ``piqa``...). Tasks defined from local files run
offline: the definitions shipped in ``evaluation/tasks/`` (``hellaswag_local``) read the file given in
``task_data``, and ``include`` adds folders of one's own YAML tasks (lm-eval's ``include_path``; see
docs/evaluation.md). `ZeroShotTasks` resolves the names and loads every task's data when it is built, so a bad
name or data out of reach fails before any long work.
"""

from __future__ import annotations

import bz2
import difflib
import functools
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError

logger = logging.getLogger(__name__)

INSTALL = 'pip install "optimum-prune[eval]"'
SHIPPED_TASKS = {path.stem: path for path in (Path(__file__).parent / "tasks").glob("*.yaml")}
_QUIET = ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.models", "datasets")


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task: its value, standard error (``None`` when lm-eval gives none) and sample count."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int


def _import_harness() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            f"Zero-shot evaluation runs lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from error
    return lm_eval


def hellaswag_jsonl(path: str | os.PathLike, folder: Path) -> Path:
    """llama.cpp's HellaSwag text file (``hellaswag_val_full.txt``, optionally ``.bz2``: 6 lines per item, the
    context, the gold label, 4 endings) as JSON lines in ``folder``; a ``.jsonl`` file is used as it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file at {path}: the task's data file (JSON lines, or llama.cpp's HellaSwag text).")
    if path.suffix == ".jsonl":
        _check_hellaswag_rows(path)
        return path.absolute()
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as file:
        lines = file.read().splitlines()
    if len(lines) % 6 or not all(lines[i + 1].strip().isdigit() for i in range(0, len(lines), 6)):
        raise InputError(f"{path} is not llama.cpp's HellaSwag text (6 lines per item: context, label, 4 endings).")
    converted = folder / f"{path.name.split('.')[0]}.jsonl"
    with open(converted, "w", encoding="utf-8") as file:
        for start in range(0, len(lines), 6):
            item = {"ctx": lines[start], "label": int(lines[start + 1]), "endings": lines[start + 2 : start + 6]}
            file.write(json.dumps(item) + "\n")
    return converted


def _check_hellaswag_rows(path: Path) -> None:
    """Each line of a HellaSwag JSON-lines file is ``{"ctx": str, "endings": [4 str], "label": 0..3}``."""
    expected = 'one JSON object per line: {"ctx": "...", "endings": ["...", "...", "...", "..."], "label": 0-3}'
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"{path}: line {number} is not valid JSON ({error.msg}): expected {expected}."
                ) from None
            valid = (
                isinstance(item, dict)
                and isinstance(item.get("ctx"), str)
                and isinstance(item.get("endings"), list)
                and len(item["endings"]) == 4
                and str(item.get("label")).strip() in ("0", "1", "2", "3")
            )
            if not valid:
                raise InputError(f"{path}: line {number} is not a HellaSwag item: expected {expected}.")


def _check_task_yaml(folders: list[str | os.PathLike]) -> list[str]:
    """Parse every YAML file of the ``include`` folders (lm-eval skips a broken one without a word); return the
    task names they define."""
    import yaml

    class _Loader(yaml.SafeLoader):
        """A safe loader that reads lm-eval's own tags (``!function ...``) as ``None``: only names matter here."""

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names = []
    for folder in folders:
        files = [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).rglob("*.y*ml"))
        for file in files:
            try:
                document = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                problem = " ".join(str(error).split())
                raise InputError(
                    f"{file} is not a valid lm-eval task YAML ({problem}): fix it or move it out of {folder}."
                ) from None
            if isinstance(document, dict) and isinstance(document.get("task"), str):
                names.append(document["task"])
    return names


class ZeroShotTasks:
    """lm-eval tasks, resolved and with their data loaded.

    Args:
        names: lm-eval task (or group) names, and the shipped local tasks (``hellaswag_local``).
        task_data: the data file of each shipped local task (``{"hellaswag_local": "hellaswag_val.jsonl"}``).
        include: folders (or YAML files' folders) of one's own lm-eval task definitions.
        limit: evaluate at most this many items per task (``None``: all).
    """

    def __init__(
        self,
        names: list[str],
        *,
        task_data: dict[str, str | os.PathLike] | None = None,
        include: list[str | os.PathLike] | None = None,
        limit: int | None = None,
    ) -> None:
        lm_eval = _import_harness()
        from lm_eval.tasks import get_task_dict

        if not names:
            raise InputError("No task to evaluate: name at least one, e.g. hellaswag_local or arc_easy.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit must be a positive integer (items per task), got {limit!r}.")
        self.names, self.limit = list(names), limit
        self.version = getattr(lm_eval, "__version__", "unknown")
        self._folder = tempfile.TemporaryDirectory(prefix="optimum-prune-tasks-")
        paths = [self._write_shipped(name, (task_data or {}).get(name)) for name in names if name in SHIPPED_TASKS]
        for folder in include or []:
            if not Path(folder).exists():
                raise FileNotFoundError(f"No task folder at {folder}: include takes folders of lm-eval YAML tasks.")
        unknown_data = sorted(set(task_data or {}) - set(SHIPPED_TASKS))
        if unknown_data:
            raise InputError(
                f"task_data for {unknown_data}: only the shipped local tasks take a data file ({', '.join(SHIPPED_TASKS)})."
            )
        own = _check_task_yaml(include or [])
        self.manager = _task_manager(tuple(dict.fromkeys([*paths, *map(os.fspath, include or [])])))
        known = set(self.manager.all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=5)
                yours = f" Your include folders define: {', '.join(own) or 'no task'}." if include else ""
                raise InputError(
                    f"Unknown lm-eval task {name!r}; close matches: {', '.join(close) or 'none'}. {len(known)} tasks "
                    f"are available (list them with `lm-eval ls tasks`); shipped local tasks: {', '.join(SHIPPED_TASKS)}."
                    + yours
                )
        for name in names:  # load each task's data now: out of reach offline fails here, naming the task
            try:
                with _quiet():
                    get_task_dict([name], self.manager)
            except Exception as error:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, OSError)
                raise InputError(
                    f"Task {name!r} cannot load its data ({type(error).__name__}: {error}). Offline, or without the "
                    "Hub, define it from local files (docs/evaluation.md): HellaSwag is shipped as hellaswag_local "
                    "(--eval-tasks hellaswag_local --eval-task-data hellaswag_local=FILE)."
                ) from error

    def _write_shipped(self, name: str, data: str | os.PathLike | None) -> str:
        """A shipped task's YAML, with its data file, in this object's folder; returns the folder."""
        if data is None:
            raise InputError(
                f"Task {name!r} reads a local file: pass task_data={{{name!r}: PATH}} (--eval-task-data {name}=PATH); "
                f"its format is described in {SHIPPED_TASKS[name]}."
            )
        folder = Path(self._folder.name)
        data_file = hellaswag_jsonl(data, folder) if name.startswith("hellaswag") else Path(data).absolute()
        if not data_file.is_file():
            raise FileNotFoundError(f"No file at {data_file}: the data of task {name!r}.")
        text = SHIPPED_TASKS[name].read_text(encoding="utf-8").replace("DATA_FILE", json.dumps(str(data_file)))
        (folder / SHIPPED_TASKS[name].name).write_text(text, encoding="utf-8")
        return str(folder)

    def evaluate(self, model: nn.Module, tokenizer: Any, batch_size: int = 8) -> list[TaskScore]:
        """Every metric of every task for ``model`` (0-shot)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if any(parameter.is_meta for parameter in model.parameters()):
            raise InputError("The model's weights are not in memory (disk offload): evaluate the saved folder instead.")
        was_training = model.training
        model.eval()
        try:
            with _quiet():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                results = simple_evaluate(
                    model=lm,
                    tasks=self.names,
                    limit=self.limit,
                    task_manager=self.manager,
                    log_samples=False,
                    verbosity="ERROR",
                )
        finally:
            model.train(was_training)
        return _scores(results)


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...]) -> Any:
    """lm-eval's index of its tasks (and those in ``include``): built once per process, it reads every YAML."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=list(include) or None)


def _scores(results: dict[str, Any]) -> list[TaskScore]:
    scores = []
    for task, metrics in results["results"].items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective", 0)
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            name = metric if kind == "none" else f"{metric} ({kind})"
            scores.append(
                TaskScore(task, name, float(value), stderr if isinstance(stderr, int | float) else None, samples)
            )
    return scores


class _quiet:
    """lm-eval's and datasets' informational logs off while the harness runs (progress bars stay), and its probe
    of the current folder's git commit skipped: outside a git checkout that probe prints git's "fatal: not a git
    repository" on stderr, and the commit of whatever folder the user runs from says nothing about the run."""

    def __enter__(self) -> None:
        import lm_eval.evaluator

        self._levels = [(logging.getLogger(name), logging.getLogger(name).level) for name in _QUIET]
        for item, _ in self._levels:
            item.setLevel(logging.ERROR)
        self._git_probe = lm_eval.evaluator.get_git_commit_hash
        lm_eval.evaluator.get_git_commit_hash = lambda: None

    def __exit__(self, *exc: object) -> None:
        import lm_eval.evaluator

        lm_eval.evaluator.get_git_commit_hash = self._git_probe
        for item, level in self._levels:
            item.setLevel(level)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    task_data: dict[str, str | os.PathLike] | None = None,
    include: list[str | os.PathLike] | None = None,
) -> list[TaskScore]:
    """Run lm-evaluation-harness ``tasks`` (0-shot) on ``model``; see `ZeroShotTasks`."""
    return ZeroShotTasks(tasks, task_data=task_data, include=include, limit=limit).evaluate(
        model, tokenizer, batch_size
    )


def compare(dense: list[TaskScore], pruned: list[TaskScore]) -> list[dict[str, Any]]:
    """Dense and pruned scores side by side, one row per task and metric (what the report and card keep)."""
    before = {(score.task, score.metric): score for score in dense}
    rows = []
    for score in pruned:
        row = {"task": score.task, "metric": score.metric, "samples": score.samples}
        row.update({f"pruned_{k}": v for k, v in asdict(score).items() if k in ("value", "stderr")})
        match = before.get((score.task, score.metric))
        if match is not None:
            row.update({"dense_value": match.value, "dense_stderr": match.stderr})
        rows.append(row)
    return rows

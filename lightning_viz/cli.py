"""``lightning-viz`` command line: LightningCLI over any LightningModule and any LightningDataModule.

Examples::

    lightning-viz fit --config demo                      # the packaged configs/demo.yaml (works from anywhere)
    lightning-viz fit --config configs/demo.yaml --trainer.max_epochs=5 --model.lr=0.001
    lightning-viz fit --model.num_classes=10 --model.in_channels=1 --data=DigitsDataModule
    lightning-viz fit --model=my_pkg.MyNet --data=my_pkg.MyData --trainer.callbacks+=lightning_viz.CAMCallback

The model defaults to :class:`~lightning_viz.models.ImageClassifier` and the data to
:class:`~lightning_viz.data.ShapesDataModule`; a config's ``model:`` or ``data:`` section without
``class_path`` gives their init arguments. ``--config NAME`` also finds the configs shipped with the
package (``demo``, ``digits``; see :func:`packaged_configs`) when no file ``NAME`` exists.
Callbacks are added under ``trainer.callbacks`` (``class_path`` + ``init_args``) in the YAML config.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import inspect
import os
import re
import textwrap
import types
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from jsonargparse import ActionConfigFile, DefaultHelpFormatter
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from . import __version__

# Imported so that jsonargparse knows the built-in data modules by their short class names.
from . import data as _data

__all__ = ["main", "cli_main", "VizCLI", "SaveConfig", "packaged_configs", "resolve_config"]

DESCRIPTION = (
    "lightning-viz: train a LightningModule with visualization callbacks that explain the CNN while it trains "
    "(filters, activations, gradients, CAMs, occlusion, top patches, embeddings, synthesis), logged to TensorBoard. "
    "Start with `lightning-viz fit --config demo`, then `tensorboard --logdir lightning_logs`."
)
CALLBACKS_HELP_HINT = (
    "Add one with --trainer.callbacks+=NAME (then --trainer.callbacks.OPTION=VALUE for that callback) or under "
    "trainer.callbacks in a YAML config; `lightning-viz fit --trainer.callbacks.help NAME` lists its options."
)
TRACKER_HINT = (
    "MapTracker is no callback but the tracker option of GradientCallback, CAMCallback and OcclusionCallback "
    "(--trainer.callbacks+=CAMCallback --trainer.callbacks.tracker=MapTracker); "
    "`lightning-viz fit --trainer.callbacks+=CAMCallback --trainer.callbacks.tracker.help MapTracker` lists its options"
)
#: Options of the visualization callbacks that take a class (their ``--trainer.callbacks.<option>.help``).
CALLBACK_CLASS_OPTIONS = ("tracker", "probes")
DEFAULT_MODEL = "lightning_viz.models.ImageClassifier"
DEFAULT_DATA = "lightning_viz.data.ShapesDataModule"


def _config_dirs() -> list[Path]:
    """Where the shipped configs live: ``lightning_viz/configs`` in an installed wheel, ``configs/`` in a checkout."""
    pkg = Path(__file__).resolve().parent
    return [pkg / "configs", pkg.parent / "configs"]


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with lightning-viz, by name (``{"demo": .../demo.yaml, ...}``)."""
    found: dict[str, Path] = {}
    for folder in _config_dirs():
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def resolve_config(value: Any) -> Any:
    """``value`` unchanged when it is an existing file (or not a plain name); else the packaged config of that
    name (``"demo"`` or ``"demo.yaml"``, also ``"configs/demo.yaml"``)."""
    if not isinstance(value, (str, os.PathLike)) or os.path.isfile(value):
        return value
    text = os.fspath(value)
    if "\n" in text or ":" in text.split("/")[-1]:  # an inline YAML/JSON config string
        return value
    name = Path(text).name
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return str(packaged_configs().get(stem, value))


def _summary(cls: Any, plain: bool = True) -> str:
    """The first sentence of ``cls``'s docstring on one line (``plain``: without the double backticks of literals)."""
    first = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    first = first.replace("``", "") if plain else first
    return re.split(r"(?<!\bal)(?<!Sec)(?<!Fig)(?<!eq)\.\s", first)[0].rstrip(".") + "." if first else ""


def callbacks_help(width: int = 100) -> str:
    """The help's list of the visualization callbacks: each name with the first sentence of its docstring."""
    from .callbacks import CALLBACKS
    from .tracking import MapTracker

    lines = [
        "visualization callbacks (lightning_viz.callbacks; MapTracker is the tracker= option of the heatmap ones):"
    ]
    for cls in (*CALLBACKS, MapTracker):
        summary = _summary(cls)
        lines.append(textwrap.fill(summary, width, initial_indent=f"  {cls.__name__:<22}", subsequent_indent=" " * 24))
    for hint in (CALLBACKS_HELP_HINT, TRACKER_HINT + "."):
        lines.append(textwrap.fill(hint, width, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(lines)


#: the end of an option's docstring entry that marks it required though its default is ``None`` (a deprecated alias
#: may stand in for it: ``UnitCallback``'s ``layer`` for ``layers``)
_REQUIRED_HELP = re.compile(r"[(;,]\s*required\)\.?\s*$")
_SPHINX_ROLE = re.compile(r":(?:func|class|data|meth|mod|attr|exc|obj):`(~?)([\w.]+)`")


def _plain(text: str) -> str:
    """The docstrings' Sphinx roles (class, func, data, ...) as plain literal names; a ``~`` keeps the last part."""
    return _SPHINX_ROLE.sub(lambda m: f"``{m.group(2).rpartition('.')[2] if m.group(1) else m.group(2)}``", text)


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, keeping the line breaks of indented lists (the callbacks list), with the
    docstrings' Sphinx roles as plain names, and saying ``required`` (not ``default: null``) for an option whose
    docstring says ``required)``."""

    def _get_help_string(self, action: Any) -> str:
        if action.default is None and not action.required and _REQUIRED_HELP.search(action.help or ""):
            action = copy.copy(action)
            action.required = True  # this copy only: the parser still takes the alias instead
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(_plain(text), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = _plain(text)
        blocks = text.split("\n\n")
        return "\n\n".join(
            "".join(indent + line for line in b.splitlines(keepends=True))
            if "\n  " in b
            else super(_HelpFormatter, self)._fill_text(b, width, indent)
            for b in blocks
        )


class VizArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose parse errors start with the line that matters: a misspelled or mistyped option of
    a callback (model, data, tracker, ...) or an unknown class name gives ``CAMCallback (trainer.callbacks): unknown
    option 'methodz'; did you mean 'methods'? allowed: ...`` before jsonargparse's union report (``Does not validate
    against any of the Union subtypes``, kept below as details), and the usage printed with the error is one line
    (``--help`` lists every option) instead of every Trainer option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)  # also the parser of ``--trainer.callbacks.help NAME``
        super().__init__(*args, **kwargs)

    def add_class_arguments(self, theclass: Any, nested_key: Optional[str] = None, *args: Any, **kwargs: Any) -> Any:
        """As jsonargparse, with the class's whole first docstring sentence as the title of its options: jsonargparse
        takes the first line, which cut ``--trainer.callbacks.help UnitCallback`` and ``--model.help`` mid-sentence."""
        added = super().add_class_arguments(theclass, nested_key, *args, **kwargs)
        if not inspect.isclass(theclass):
            return added
        group = getattr(self, "groups", {}).get(nested_key if nested_key is not None else theclass.__name__)
        summary = _summary(theclass, plain=False)
        if group is not None and summary and group.title and summary.startswith(group.title.rstrip(":")):
            group.title = summary.rstrip(".")
        return added

    def error(self, message: str, ex: Optional[Exception] = None) -> Any:
        lead = parse_error_summary(message) if self.exit_on_error else None  # not in jsonargparse's inner parsers
        unknown = re.match(
            r"unrecognized arguments: (?:\w+ )?--([\w.]+)|Subcommand '\w+' does not accept option '([\w.]+)'", message
        )
        if lead is None and unknown and self.exit_on_error:
            given = unknown.group(1) or unknown.group(2)
            subs = getattr(getattr(self, "_subcommands_action", None), "_name_parser_map", {})
            parsers = [getattr(ex, "subcommand_parser", None) or self, *subs.values()]
            known = [o[2:] for p in parsers for o in getattr(p, "_option_string_actions", {}) if o.startswith("--")]
            close = difflib.get_close_matches(given, known, n=1, cutoff=0.8)
            message += f" (did you mean --{close[0]}?)" if close else ""
        if lead is not None:
            message = lead + "\n  details:\n" + textwrap.indent(message, "    ")
        super().error(message, ex)

    def format_usage(self) -> str:
        return f"usage: {self.prog.replace(' [options]', '')} [-h] [-c CONFIG] [--print_config] [options]\n"

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        """jsonargparse's help; that of a callback's class option (``--trainer.callbacks.tracker.help MapTracker``)
        names its options as given on the command line, ``--trainer.callbacks.tracker.filmstrip``, not as inside the
        callback's own parser (``--tracker.filmstrip``, which the command line refuses)."""
        text = super().format_help(*args, **kwargs)
        nested = re.match(r"Help for --(\w+)\.help=", self.description or "")
        if nested and nested.group(1) in CALLBACK_CLASS_OPTIONS:
            text = re.sub(rf"(?<![\w.-])--{nested.group(1)}\.", f"--trainer.callbacks.{nested.group(1)}.", text)
        return text


_PROBLEM = re.compile(r"^(\s*)- Problem with given class_path '([^']+)':\s*$")
_PARSER_KEY = re.compile(r'^\s*Parser key "([^"]+)":\s*$')
_NOT_ACCEPTED = re.compile(r"^\s*Option '([^']+)' is not accepted")
_NO_IMPORT = re.compile(r"^\s*(No module named|module '[^']+' has no attribute|Unable to import)")
_NOT_DOTTED = re.compile(r"Expected a dot import path string: (\S+)")
_NOT_SUBCLASS = re.compile(r"Import path (\S+) does not correspond to a subclass of (\w+)")
_BASES = {"Callback", "LightningModule", "LightningDataModule", "Logger"}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except Exception:
        return None


def class_options(cls: Any) -> list[str]:
    """The init options the CLI accepts for ``cls`` (jsonargparse's view: ``**kwargs`` followed into the bases)."""
    from jsonargparse import ArgumentParser

    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x")
    except Exception:
        return []
    return [a.dest[2:] for a in parser._actions if a.dest.startswith("x.") and not a.dest.endswith(".help")]


def _accepts_none(hint: Any) -> bool:
    """Whether a jsonargparse type hint takes ``None`` (``Optional[...]``, ``X | None``, ``Any``, a None Literal)."""
    if hint is None or hint is type(None) or hint is Any or hint is object or isinstance(hint, str):
        return True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts_none(a) for a in get_args(hint))
    if origin is Literal:
        return None in get_args(hint)
    return False


def _type_name(hint: Any) -> str:
    return re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", str(hint)).replace("typing.", "")


def null_option_error(cfg: Any, key: str = "") -> Optional[str]:
    """The first ``null`` given to an option whose type does not take ``None``, in the classes of a parsed config
    (``class_path`` + ``init_args``, nested ones too), as ``CAMCallback (trainer.callbacks): num_probes: null is not
    allowed; expected int (default: 16)``; ``None`` when there is none. jsonargparse accepts ``null`` for any
    init argument of a class given by ``class_path``, so ``num_probes: null`` (or ``--model.lr=null``) failed only
    when the class was built or trained, with Python's ``'<' not supported ...``, or not at all (``log_time: null``)."""
    from jsonargparse import ArgumentParser, Namespace

    def walk(node: Any, where: str) -> Optional[str]:
        if isinstance(node, list):
            return next((m for item in node if (m := walk(item, where)) is not None), None)
        if not isinstance(node, (Namespace, dict)):
            return None
        items = vars(node) if isinstance(node, Namespace) else node
        path, init = items.get("class_path"), items.get("init_args")
        if not (isinstance(path, str) and isinstance(init, (Namespace, dict))):
            return next((m for k, v in items.items() if (m := walk(v, f"{where}.{k}" if where else k))), None)
        name = path.rpartition(".")[2]
        here = f"{where}: {name}" if ":" in where else f"{name} ({where})"
        args = vars(init) if isinstance(init, Namespace) else init
        nulls = [opt for opt, value in args.items() if value is None]
        cls = _import(path) if nulls else None
        if cls is not None:
            parser = ArgumentParser(exit_on_error=False)
            with contextlib.suppress(Exception):  # a class jsonargparse cannot describe: nothing to check
                parser.add_class_arguments(cls, "x")
            actions = {a.dest[2:]: a for a in parser._actions if a.dest.startswith("x.")}
            for opt in nulls:
                hint = getattr(actions.get(opt), "_typehint", None)
                if hint is not None and not _accepts_none(hint):
                    default = actions[opt].default
                    return f"{here}: {opt}: null is not allowed; expected {_type_name(hint)} (default: {default!r})"
        return next((m for opt, v in args.items() if (m := walk(v, f"{here}: {opt}"))), None)

    return walk(cfg, key)


def _class_candidates(key: str) -> dict[str, str]:
    """Short class name -> import path of the classes a config key usually takes (for 'did you mean')."""
    from lightning.pytorch import callbacks as pl_callbacks
    from lightning.pytorch import loggers as pl_loggers

    from . import callbacks as viz_callbacks

    last = key.split(".")[-1].split("[")[0]
    bases: dict[str, tuple[type, list[Any]]] = {
        "callbacks": (pl_callbacks.Callback, [viz_callbacks, pl_callbacks]),
        "logger": (pl_loggers.Logger, [pl_loggers]),
        "data": (LightningDataModule, [_data]),
    }
    base, modules = bases.get(last, (object, []))
    found = {"MapTracker": "lightning_viz.tracking.MapTracker"} if last == "tracker" else {}
    if last == "model":
        found["ImageClassifier"] = DEFAULT_MODEL
    for module in modules:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if inspect.isclass(obj) and issubclass(obj, base) and name not in _BASES and not inspect.isabstract(obj):
                found.setdefault(name, f"{obj.__module__}.{name}")
    return found


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown_class(key: str, given: str, where: str = "", problem: str = "unknown class") -> str:
    """``<where>: unknown class '<given>'; did you mean ...? allowed: ...`` for a class name the CLI cannot import."""
    name = given.rpartition(".")[2]
    if name == "MapTracker" and key.split(".")[-1] == "callbacks":
        return f"{where or key}: {TRACKER_HINT}"
    candidates = _class_candidates(key)
    module = _import(given.rpartition(".")[0]) if "." in given else None
    names = sorted(
        {*candidates, *(n for n in dir(module) if inspect.isclass(getattr(module, n)))} if module else candidates
    )
    viz = [n for n in candidates if n in _viz_callback_names()]
    listed = ", ".join(viz or candidates)
    allowed = f" allowed: {listed}, or the full import path of a class" if listed else " give the full import path"
    hint = _did_you_mean(name, names) if problem == "unknown class" else ""
    return f"{where or key}: {problem} '{given}'{hint};{allowed}"


def _viz_callback_names() -> set[str]:
    from .callbacks import CALLBACKS

    return {c.__name__ for c in CALLBACKS}


def _tidy(expected: str) -> str:
    """``Expected a <class 'int'>. Got value: x`` -> ``expected int, got 'x'`` (Literal choices listed)."""
    m = re.match(r"Expected a (.+?)\. Got value: (.*)$", expected.strip())
    if not m:
        return expected.strip()
    kind, value = m.groups()
    kind = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", kind)
    lit = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
    kind = f"one of {lit.group(1)}" if lit else kind
    return f"expected {kind}, got {value!r}"


_UNION = "Does not validate against any of the Union subtypes"
_REQUIRED = re.compile(r"^\s*the following arguments are required: (.+)$")


def _split_top(text: str) -> list[str]:
    """``"list[str], Literal['a', 'b']"`` -> ``["list[str]", "Literal['a', 'b']"]`` (commas outside brackets)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def _kind(hint: str) -> str:
    """A type as the error line says it: ``Literal['a', 'b']`` -> ``one of 'a', 'b'``, ``list[Literal[...]]`` ->
    ``a list of 'a', 'b'``."""
    if lit := re.fullmatch(r"Literal\[(.*)\]", hint):
        return f"one of {lit.group(1)}"
    if lit := re.fullmatch(r"list\[Literal\[(.*)\]\]", hint):
        return f"a list of {lit.group(1)}"
    return hint


def _union_mismatch(block: list[str]) -> Optional[str]:
    """``expected list[str] or null, got 'tensorboard' (a list: [tensorboard])`` from jsonargparse's report of a
    value that matches no member of an option's Union type (``block`` starts at its 'Does not validate' line);
    ``None`` when a member is a class (a nested class's own error, read further by the caller)."""
    indent = len(block[0]) - len(block[0].lstrip())
    own = [b for b in block[1:] if b.strip()]
    end = next((j for j, b in enumerate(own) if len(b) - len(b.lstrip()) < indent), len(own))
    own = own[:end]
    if any(_PROBLEM.match(b) for b in own):
        return None
    top = [b.strip().partition(": ") for b in own if len(b) - len(b.lstrip()) == indent]
    field = {name: text for name, _, text in top}
    if "Subtypes" not in field or "Given value" not in field:
        return None
    kinds = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", field["Subtypes"][1:-1])
    kinds = re.sub(r"\bNoneType\b", "null", kinds.replace("typing.", ""))
    expected = " or ".join(_kind(k) for k in _split_top(kinds))
    value = field["Given value"]
    is_str = "'str'" in field.get("Given value type", "")
    hint = ""
    item = next((m for b in own if (m := re.match(r"^\s*- Expected a <class 'str'>\. Got value: (.*)$", b))), None)
    if item and item.group(1) in ("True", "False"):
        hint = f" ({item.group(1)} is a boolean: YAML reads unquoted yes/no/on/off as booleans; quote names, 'no')"
    elif item and not is_str:
        hint = f" ({item.group(1)} is a number: quote names, '{item.group(1)}')"
    elif is_str and value == "None" and "null" in expected:  # jsonargparse re-reads a nested class's null as text
        hint = " (null on the command line reaches an option of a class inside a class as 'None': set it in YAML)"
    elif is_str and "list" in expected and "one of" not in expected and not value.startswith("["):
        hint = f" (a list: [{value}])"
    shown = repr(value) if is_str else value
    return f"expected {expected}, got {shown}{hint}"


def parse_error_summary(message: str) -> Optional[str]:
    """One line saying what is wrong in a jsonargparse parse error, naming the class (the callback, the model, the
    data, a tracker), the option, what was wrong and what is allowed; ``None`` when the message is none of the
    recognized kinds (an unknown option, a value of the wrong type, an unknown class)."""
    lines = message.splitlines()
    top = (_PARSER_KEY.match(lines[0]) or re.match(r"^--([\w.]+)\.help: ", lines[0])) if lines else None
    key = top.group(1) if top else "option"  # the --trainer.callbacks.help NAME of a misspelled NAME: its key
    context: list[tuple[int, str, str]] = []  # (indent, "CAMCallback (trainer.callbacks): tracker", "tracker")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        context = [c for c in context if c[0] < indent]
        dotted = _NOT_DOTTED.search(line)
        if dotted:
            return (
                _unknown_class(context[-1][2], dotted.group(1), context[-1][1])
                if context
                else _unknown_class(key, dotted.group(1))
            )
        wrong = _NOT_SUBCLASS.search(line)
        if wrong:
            problem = f"not a subclass of {wrong.group(2)}:"
            return _unknown_class(
                context[-1][2] if context else key, wrong.group(1), context[-1][1] if context else "", problem
            )
        m = _PROBLEM.match(line)
        if not m:
            continue
        path = m.group(2)
        name = path.rpartition(".")[2]
        where = f"{context[-1][1]}: {name}" if context else f"{name} ({key})"
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        after = lines[i + 2] if i + 2 < len(lines) else ""
        if name in _BASES:  # the base class tried as the union's other member: not what the user meant
            if re.match(r"^\s*Option 'class_path' is not accepted", nxt):  # init args next to class_path
                return (
                    f"{context[-1][1] if context else key}: a class's options go under init_args "
                    "(class_path: NAME, then init_args: {option: value}), not next to class_path"
                )
            continue
        if opt := _NOT_ACCEPTED.match(nxt):
            cls = _import(path)
            allowed = class_options(cls) if cls is not None else []
            hint = _did_you_mean(opt.group(1), allowed)
            listed = f"; allowed: {', '.join(allowed)}" if allowed else ""
            return f"{where}: unknown option '{opt.group(1)}'{hint}{listed}"
        if _NO_IMPORT.match(nxt):
            return _unknown_class(context[-1][2], path, context[-1][1]) if context else _unknown_class(key, path)
        if required := _REQUIRED.match(nxt):
            return f"{where}: missing required option {required.group(1)}"
        sub = _PARSER_KEY.match(nxt)
        if sub and after.strip().startswith("Expected"):
            return f"{where}: {sub.group(1)}: {_tidy(after)}"
        if sub and after.strip() == _UNION:
            union = _union_mismatch(lines[i + 2 :])
            if union is not None:
                return f"{where}: {sub.group(1)}: {union}"
        if sub:
            context.append((indent, f"{where}: {sub.group(1)}", sub.group(1)))
    return None


class _ConfigFile(ActionConfigFile):
    """``--config``: a path, an inline config, or the name of a packaged config (``demo``)."""

    def __call__(self, parser: Any, cfg: Any, values: Any, option_string: Optional[str] = None) -> None:
        super().__call__(parser, cfg, resolve_config(values), option_string)


class _RootDirTrainer:
    """A view of a Trainer whose ``log_dir`` is its ``default_root_dir`` (everything else is the Trainer's)."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    @property
    def log_dir(self) -> str:
        return self._trainer.default_root_dir


class SaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (the resolved config as ``config.yaml`` in ``trainer.log_dir``), which saves
    into ``default_root_dir`` (as without a logger) where the first logger has no local directory: an
    ``MLFlowLogger`` with a database or server tracking URI (``sqlite:///...``, ``http://...``), whose ``save_dir`` is
    ``None``. Lightning's own stops the fit there with a bare ``assert log_dir is not None``
    (Lightning-AI/pytorch-lightning#19441)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.save_to_log_dir and not self.already_saved and trainer.log_dir is None:  # every rank asks (broadcast)
            super().setup(_RootDirTrainer(trainer), pl_module, stage)  # type: ignore[arg-type]
        else:
            super().setup(trainer, pl_module, stage)


class VizCLI(LightningCLI):
    """LightningCLI with lightning-viz's defaults, ``--version``, packaged configs by name, and the config saved also
    where the first logger has no local directory (:class:`SaveConfig`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) < 3:  # save_config_callback is the third positional argument
            kwargs.setdefault("save_config_callback", SaveConfig)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", ["lightning-viz==" + __version__])
        kwargs.setdefault("description", DESCRIPTION)
        kwargs.setdefault("epilog", callbacks_help())
        kwargs.setdefault("formatter_class", _HelpFormatter)
        parser_class = VizArgumentParser if self.parser_class is LightningArgumentParser else self.parser_class
        parser = parser_class(**kwargs)
        parser.add_argument(
            "-c",
            "--config",
            action=_ConfigFile,
            help="Path to a configuration file in json or yaml format, or the name of a packaged config: "
            + ", ".join(packaged_configs())
            + ".",
        )
        parser.add_argument("--version", action="version", version=f"lightning-viz {__version__}")
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """As LightningCLI, with each subcommand's whole first docstring sentence as its help: Lightning takes the
        first line only, which cut ``test`` and ``predict`` mid-sentence (``... never run on your``)."""
        trainer = self.trainer_class if isinstance(self.trainer_class, type) else None
        full: dict[str, str] = {}
        for name in self.subcommands() if trainer is not None else ():
            doc = inspect.getdoc(getattr(trainer, name, None)) or ""
            full[name] = " ".join(doc.split("\n\n")[0].split())
            kwargs[name] = {"description": full[name], **kwargs.get(name, {})}
        super()._add_subcommands(parser, **kwargs)
        for action in getattr(getattr(parser, "_subcommands_action", None), "_choices_actions", []):
            if full.get(action.dest):
                action.help = full[action.dest]
        for name, sub in getattr(self, "_subcommand_parsers", {}).items():
            for group in sub._action_groups if full.get(name) else ():  # the method's own arguments (ckpt_path)
                if group.title and full[name].startswith(group.title) and len(group.title) < len(full[name]) - 1:
                    group.title = full[name].rstrip(".")  # argparse adds the ':

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``ImageClassifier`` and ``ShapesDataModule`` as the default model and data where they may be chosen:
        in subclass mode, of a base class they derive from (not in ``VizCLI(MyNet, MyData)``, a script's own)."""
        defaults = {}
        for key, path, base, subclass in (
            ("model", DEFAULT_MODEL, self._model_class, self.subclass_mode_model),
            ("data", DEFAULT_DATA, self._datamodule_class, self.subclass_mode_data),
        ):
            cls = _import(path) if subclass else None
            if inspect.isclass(cls) and inspect.isclass(base) and issubclass(cls, base):
                defaults[key] = {"class_path": path}
        if defaults:
            parser.set_defaults(defaults)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI, parsing again with the chosen model/data class as the default where it is not the
        built-in one: jsonargparse carries init_args over to a new class_path, so the built-in defaults'
        values (ShapesDataModule's batch_size=64, ImageClassifier's lr) replaced the own defaults of
        ``--model=my.Net`` / ``--data=my.Data``. A ``null`` for an option that takes no ``None`` is a parse error
        (:func:`null_option_error`)."""
        import sys

        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
        printing = argv is not None and any(a.split("=")[0] == "--print_config" for a in argv)
        first = [a for a in argv if a.split("=")[0] != "--print_config"] if printing else args  # type: ignore
        with warnings.catch_warnings():
            if args is None:  # the command line itself: not "both args and command line arguments" (Lightning's)
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, first)
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        problem = null_option_error(cfg)
        if problem is not None:
            parser.error(problem)
        try:  # jsonargparse's subcommand parser (argparse's _name_parser_map)
            target = parser._subcommands_action._name_parser_map[sub] if sub else parser  # type: ignore[union-attr]
        except (AttributeError, KeyError, TypeError):  # another jsonargparse: parsed once, as LightningCLI does
            if printing:
                super().parse_arguments(parser, args)
            return
        chosen = {key: cfg[key]["class_path"] for key in ("model", "data") if "class_path" in (cfg.get(key) or {})}
        if chosen and chosen != {"model": DEFAULT_MODEL, "data": DEFAULT_DATA}:
            target.set_defaults({key: {"class_path": path} for key, path in chosen.items()})
            super().parse_arguments(parser, args)
        elif printing:
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a bad init argument of a lightning-viz class (a callback option, pretrained
        weights not in the cache) ends with that class's own message instead of jsonargparse's union error
        (``Does not validate against any of the Union subtypes ...``) with the message buried inside."""
        try:
            super().instantiate_classes()
        except Exception as exc:
            own = _own_error(exc)
            if own is None:
                raise
            raise own.with_traceback(None) from None


_PACKAGE = Path(__file__).resolve().parent


def _own_error(exc: BaseException) -> Optional[BaseException]:
    """The outermost error in ``exc``'s chain that lightning-viz code raised itself (a ``ValueError``,
    ``TypeError`` or ``OSError`` whose innermost frame is in this package), else ``None``."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        tb = cur.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        own = tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
        if own and isinstance(cur, (ValueError, TypeError, OSError)):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, run) the CLI on ``args`` (default ``sys.argv[1:]``); returns the ``LightningCLI``."""
    return VizCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point (``lightning-viz``); returns nothing so the exit status is 0 on success."""
    cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Meta-training configuration: one typed dataclass, presets, files, validation.

:class:`MetaConfig` holds every key with its one default. Precedence, lowest
first: the dataclass defaults < preset < config file < command-line flags
(:func:`resolve`). Every value is checked when a config is built: unknown keys
and bad values raise a :class:`ConfigError` that names the key, because a typo
silently falling back to a default would waste a long run.

Checkpoints store the config as a plain dict (:func:`stored`: JSON, without
the per-invocation keys :data:`PER_INVOCATION`); :func:`resume` reads one
back: keys added since it was written get their defaults, and keys since
retired (:data:`RETIRED_KEYS`) are dropped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    pass


def _key(default=dataclasses.MISSING, *, check: str, choices: tuple = (), factory=None):
    """A config field: its default and the rule :meth:`MetaConfig.__post_init__` checks."""
    meta = {"check": check, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MetaConfig:
    # what is trained
    lopt: str = _key("gmn", check="choice", choices=("gmn", "mlp"))
    lopt_config: dict[str, Any] = _key(check="mapping", factory=dict)  # kwargs of l2o.make_lopt
    init_from: str = _key("", check="str")     # warm start: weights file of another run (matching names and
                                               # shapes copied)
    freeze: list[str] = _key(check="names", factory=list)  # metanetwork parameters kept at their initial
                                               # values: names or name prefixes (e.g. [log_nominal])
    # what it is trained on
    suite: str = _key("train", check="nonempty")    # train | heldout | families | mix | comma-separated names
    eval_task: str = _key("conv1d~valid~0", check="str")  # task of the quick evaluation (never a test task)
    # the inner problem
    inner_steps: int = _key(200, check="pos_int")   # length T of one inner run (then a new task is drawn)
    inner_steps_max: int = _key(0, check="nonneg_int")  # > inner_steps: each run's length is drawn
                                               # log-uniformly in [inner_steps, this] (mixed horizons)
    unroll: int = _key(10, check="pos_int")         # truncation length K: inner steps per outer step
    meta_batch: int = _key(4, check="pos_int")      # inner runs per outer step (split across ranks)
    meta_objective: str = _key("norm", check="choice", choices=("norm", "log", "raw"))  # norm: loss / run's
                                               # initial loss | log: log(loss) | raw: loss
    meta_log_floor: float = _key(0.0, check="nonneg_float")  # log objective: log(loss + this x initial
                                               # loss); progress below that level earns nothing
    meta_data: str = _key("train", check="choice", choices=("train", "valid"))  # batches of the meta-loss:
                                               # fresh training batches | the inner task's held-out data
    second_order: bool = _key(False, check="bool")  # differentiate through the gradient (create_graph=True)
    batch_runs: bool = _key(False, check="bool")    # tbptt: one metanetwork pass per step over the union of
                                               # the runs' graphs (faster; the same estimate)
    diverge_factor: float = _key(10.0, check="pos_float")  # a run above this x its initial loss is reset
    # the meta-gradient estimator (l2o.meta.outer.ESTIMATORS)
    estimator: str = _key("tbptt", check="choice", choices=("tbptt", "es", "pes"))
    es_pairs: int = _key(4, check="pos_int")        # antithetic pairs per inner run (es, pes)
    es_sigma: float = _key(0.01, check="pos_float")  # perturbation scale on the metanetwork weights (es, pes)
    # the outer optimizer
    outer_steps: int = _key(1000, check="nonneg_int")  # 0: write the initial metanetwork (a baseline) and stop
    lr: float = _key(3e-4, check="pos_float")
    weight_decay: float = _key(0.0, check="nonneg_float")  # AdamW-style decoupled decay when > 0
    warmup: int = _key(50, check="nonneg_int")      # linear warmup steps, then cosine decay
    min_lr_frac: float = _key(0.1, check="nonneg_float")  # cosine ends at lr * min_lr_frac
    nominal_lr_mult: float = _key(1.0, check="pos_float")  # outer lr multiplier of the learned scalar step
                                               # sizes (a scalar otherwise moves ~lr per step)
    clip: float = _key(1.0, check="nonneg_float")   # meta-gradient norm clip (0: off)
    # bookkeeping
    device: str = _key("cpu", check="str")
    seed: int = _key(0, check="int")
    out: str = _key("runs/meta", check="str")
    checkpoint_every: int = _key(50, check="nonneg_int")  # outer steps between checkpoints (one at the end)
    eval_every: int = _key(100, check="nonneg_int")  # outer steps between quick evaluations (0: off)
    eval_steps: int = _key(100, check="pos_int")    # inner steps of a quick evaluation
    log_every: int = _key(1, check="pos_int")       # outer steps between TensorBoard scalars
    stop_after: int = _key(0, check="nonneg_int")   # stop (with a checkpoint) after this many steps here
    progress: bool = _key(True, check="bool")       # tqdm progress bar
    threads: int = _key(0, check="nonneg_int")      # torch CPU threads per process (0: torch's default)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), f.metadata))
        if self.inner_steps_max and self.inner_steps_max < self.inner_steps:
            raise ConfigError(f"inner_steps_max ({self.inner_steps_max}) must be 0 or >= inner_steps "
                              f"({self.inner_steps})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what checkpoints store)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes) -> "MetaConfig":
        return dataclasses.replace(self, **changes)


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MetaConfig))
CHOICES: dict[str, tuple] = {f.name: f.metadata["choices"] for f in dataclasses.fields(MetaConfig)
                             if f.metadata["check"] == "choice"}
# Keys older checkpoints may hold that are no longer configuration (dropped when resuming).
# inject_nan_steps: a testing aid, now l2o.meta.faults.nan_meta_loss.
RETIRED_KEYS = ("inject_nan_steps",)
# Keys that may change when a run is resumed without changing what it computes
# (or that obviously mean "continue longer" / "run elsewhere").
RESUMABLE_OVERRIDES = ("outer_steps", "checkpoint_every", "eval_every", "eval_steps", "log_every",
                       "stop_after", "progress", "device", "threads", "out",
                       "batch_runs")   # the same estimate, computed with fewer, larger passes
# Keys about this one invocation, not about the run: never stored in a checkpoint (see
# :func:`stored`), so a resume starts from their defaults. A stored stop_after would make
# every later resume stop early again; a stored progress: false would hide the bar for good.
PER_INVOCATION = ("stop_after", "progress")

_INT_RULES = {"pos_int": (1, ">= 1"), "nonneg_int": (0, ">= 0"), "int": (None, "")}
_FLOAT_RULES = {"pos_float": "> 0", "nonneg_float": ">= 0"}


def _checked(key: str, value, meta: Mapping) -> Any:
    """``value`` if it obeys the field's rule (floats coerced to float), else a ConfigError naming ``key``."""
    check = meta["check"]
    if check == "choice":
        if value not in meta["choices"]:
            raise ConfigError(f"{key} must be one of {meta['choices']}, got {value!r}")
    elif check in _INT_RULES:
        low, text = _INT_RULES[check]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ConfigError(f"{key} must be {text}, got {value}")
    elif check in _FLOAT_RULES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if value < 0 or (check == "pos_float" and value == 0):
            raise ConfigError(f"{key} must be {_FLOAT_RULES[check]}, got {value}")
        value = float(value)
    elif check == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif check == "str" and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    elif check == "nonempty" and not (isinstance(value, str) and value):
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    elif check == "mapping" and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of constructor arguments, got {value!r}")
    elif check == "names" and not (isinstance(value, list) and all(isinstance(n, str) and n for n in value)):
        raise ConfigError(f"{key} must be a list of metanetwork parameter names, got {value!r}")
    return value


PRESETS: dict[str, dict[str, Any]] = {
    # About a minute on a 2-core CPU: small tasks, short runs, quick eval.
    "tiny": {
        "suite": "mlp_synthetic,regression_teacher,mlp_digits",
        "eval_task": "regression~valid~0",
        "inner_steps": 30,
        "unroll": 5,
        "meta_batch": 2,
        "outer_steps": 24,
        "lr": 1e-3,
        "warmup": 5,
        "checkpoint_every": 12,
        "eval_every": 12,
        "eval_steps": 30,
        "lopt_config": {},
        "es_pairs": 2,
    },
    # A real (but still single-machine) run: the whole train suite plus sampled configs.
    "small": {
        "suite": "mix",
        "inner_steps": 300,
        "unroll": 10,
        "meta_batch": 8,
        "outer_steps": 3000,
        "lr": 3e-4,
        "warmup": 100,
        "checkpoint_every": 100,
        "eval_every": 250,
        "eval_steps": 200,
    },
}


def _yaml_loader():
    """PyYAML's safe loader, reading floats as YAML 1.2 (and JSON, and Python) do.

    PyYAML follows YAML 1.1, whose float pattern needs a dot: ``lr: 3e-4``
    would come back as the string '3e-4' and be refused, though it is how
    everyone writes a learning rate. Also applies inside ``lopt_config``.
    """
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # add_implicit_resolver copies the inherited table first: SafeLoader itself stays as it was.
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _numeric_strings_as_floats(data: dict[str, Any]) -> dict[str, Any]:
    """Float keys given as numeric strings (``lr: "3e-4"``, quoted in YAML or JSON) as floats;
    anything else is left for the checker to refuse with the key's name."""
    floats = {f.name for f in dataclasses.fields(MetaConfig) if f.metadata["check"] in _FLOAT_RULES}
    out = dict(data)
    for key, value in data.items():
        if key in floats and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):     # "nan" / "inf" stay strings and are refused
                out[key] = number
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file: YAML (``.yaml``/``.yml``) or JSON, a flat mapping of keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as err:
            # PyYAML's message spans several lines (with a caret); one line naming the file and place.
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML: {what}{where}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            hint = " (YAML files must be named .yaml or .yml)" if path.suffix not in (".json", "") else ""
            raise ConfigError(f"{path}: not valid JSON: {err}{hint}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    # Config files may use the flag spelling (outer-steps) as well as the key spelling.
    return _numeric_strings_as_floats({str(k).replace("-", "_"): v for k, v in data.items()})


def _check_known(values: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        retired = [k for k in unknown if k in RETIRED_KEYS]
        hint = (f" ({', '.join(retired)}: no longer configuration; tests inject faults with "
                "l2o.meta.faults)" if retired else "")
        raise ConfigError(f"unknown config key(s) in {source}: {unknown}{hint}; known keys: {sorted(KEYS)}")


def resolve(preset: str | None = None, file_values: Mapping | None = None,
            overrides: Mapping | None = None) -> MetaConfig:
    """defaults < preset < file < overrides, validated."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values.update(json.loads(json.dumps(PRESETS[preset])))   # a copy: presets stay untouched
    for source, given in (("config file", file_values or {}), ("flags", overrides or {})):
        _check_known(given, source)
        values.update(given)
    return MetaConfig(**values)


def stored(cfg: MetaConfig) -> dict[str, Any]:
    """What a checkpoint stores of ``cfg``: :meth:`MetaConfig.to_dict` less :data:`PER_INVOCATION`."""
    return {k: v for k, v in cfg.to_dict().items() if k not in PER_INVOCATION}


def from_checkpoint(saved: Mapping[str, Any]) -> MetaConfig:
    """The config a checkpoint stored (a plain dict, possibly of an older version).
    :data:`PER_INVOCATION` keys that older versions stored are dropped: they get their defaults."""
    values = {k: v for k, v in saved.items() if k not in PER_INVOCATION}
    for key in RETIRED_KEYS:
        if values.pop(key, None):
            warnings.warn(f"the checkpoint's config sets {key}, no longer a config key: ignored", stacklevel=2)
    _check_known(values, "the checkpoint")
    return MetaConfig(**values)


def resume(saved: Mapping[str, Any], flags: Mapping[str, Any]) -> MetaConfig:
    """The checkpoint's config with the flags given on resume, which may change only
    :data:`RESUMABLE_OVERRIDES`."""
    cfg = from_checkpoint(saved)
    _check_known(flags, "flags")
    current = cfg.to_dict()
    changed = sorted(k for k, v in flags.items() if current[k] != v and k not in RESUMABLE_OVERRIDES)
    if changed:
        raise ConfigError(f"cannot change {changed} when resuming (would not continue the same run); "
                          f"resumable overrides: {RESUMABLE_OVERRIDES}")
    return cfg.replace(**flags)

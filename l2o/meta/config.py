"""Meta-training configuration: plain values, presets, files, validation.

A config is a flat ``dict`` of plain values (JSON-serialisable), so it goes
into checkpoints unchanged. Precedence, lowest first: ``DEFAULTS`` < preset <
config file < command-line flags. Unknown keys and bad values raise errors
that name the key, because a typo silently falling back to a default would
waste a long run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    # what is trained
    "lopt": "gmn",               # gmn | mlp
    "lopt_config": {},           # constructor kwargs of the metanetwork (l2o.make_lopt)
    "init_from": "",             # warm start: weights file of another run (matching names and shapes copied)
    "freeze": [],                # metanetwork parameters kept at their initial values: names or name
                                 # prefixes (e.g. [log_nominal]: the nominal step size is not meta-learned)
    # what it is trained on
    "suite": "train",            # train | heldout | families | mix | comma-separated task names
    "eval_task": "conv1d~valid~0",  # validation task of the quick evaluation (never a test task)
    # the inner problem
    "inner_steps": 200,          # length T of one inner training run (then a new task is sampled)
    "inner_steps_max": 0,        # > inner_steps: each run's length is drawn log-uniformly in
                                 # [inner_steps, inner_steps_max] (mixed horizons); 0: always inner_steps
    "unroll": 10,                # truncation length K: inner steps per outer step
    "meta_batch": 4,             # inner runs per outer step (split across ranks)
    "meta_objective": "norm",    # norm: loss / run's initial loss | log: log(loss) | raw: loss
    "meta_data": "train",        # batches the meta-loss is measured on: train (fresh training batches)
                                 # | valid (the inner task's held-out data: rewards generalisation)
    "second_order": False,       # differentiate through the gradient too (create_graph=True)
    "batch_runs": False,         # tbptt: unroll the meta-batch's runs together, one metanetwork pass per
                                 # step over the union of their graphs (faster; same estimate)
    "diverge_factor": 10.0,      # an inner run whose loss exceeds this x its initial loss is reset
    # the meta-gradient estimator
    "estimator": "tbptt",        # tbptt | es (antithetic, truncated) | pes (persistent ES)
    "es_pairs": 4,               # antithetic pairs per inner run (es, pes)
    "es_sigma": 0.01,            # perturbation scale on the metanetwork weights (es, pes)
    # the outer optimizer
    "outer_steps": 1000,
    "lr": 3e-4,
    "weight_decay": 0.0,         # AdamW-style decoupled decay when > 0
    "warmup": 50,                # linear warmup steps, then cosine decay
    "min_lr_frac": 0.1,          # cosine ends at lr * min_lr_frac
    "nominal_lr_mult": 1.0,      # outer lr multiplier of the learned scalar step sizes (nominal weight,
                                 # controller rate): a scalar otherwise moves ~lr per step, far slower
                                 # than the rest
    "clip": 1.0,                 # meta-gradient norm clip (0: off)
    # bookkeeping
    "device": "cpu",
    "seed": 0,
    "out": "runs/meta",
    "checkpoint_every": 50,      # outer steps between checkpoints (always one at the end)
    "eval_every": 100,           # outer steps between quick held-out evaluations (0: off)
    "eval_steps": 100,           # inner steps of a quick evaluation
    "log_every": 1,              # outer steps between TensorBoard scalars
    "stop_after": 0,             # stop (with a checkpoint) after this many steps in this process (0: off)
    "progress": True,            # tqdm progress bar
    "threads": 0,                # torch CPU threads per process (0: torch's default)
    "inject_nan_steps": [],      # testing aid: outer steps whose meta-loss is forced to NaN
}

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

CHOICES = {
    "lopt": ("gmn", "mlp"),
    "estimator": ("tbptt", "es", "pes"),
    "meta_objective": ("norm", "log", "raw"),
    "meta_data": ("train", "valid"),
}
POSITIVE_INT = ("inner_steps", "unroll", "meta_batch", "outer_steps", "es_pairs", "eval_steps",
                "log_every")
NONNEG_INT = ("inner_steps_max", "warmup", "checkpoint_every", "eval_every", "stop_after", "threads")
POSITIVE_FLOAT = ("lr", "es_sigma", "diverge_factor", "nominal_lr_mult")
NONNEG_FLOAT = ("weight_decay", "clip", "min_lr_frac")


class ConfigError(ValueError):
    pass


def load_file(path: str | Path) -> dict[str, Any]:
    """A config file: YAML (``.yaml``/``.yml``) or JSON, a flat mapping of keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    # Config files may use the flag spelling (outer-steps) as well as the key spelling.
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(preset: str | None = None, file_values: dict | None = None,
            overrides: dict | None = None) -> dict[str, Any]:
    """DEFAULTS < preset < file < overrides, validated."""
    cfg = json.loads(json.dumps(DEFAULTS))  # deep copy of plain values
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg.update(PRESETS[preset])
    for source, values in (("config file", file_values or {}), ("flags", overrides or {})):
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown config key(s) in {source}: {unknown}; known keys: {sorted(DEFAULTS)}")
        cfg.update(values)
    return validate(cfg)


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {cfg[key]!r}")
    for key in POSITIVE_INT + NONNEG_INT:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if value < (1 if key in POSITIVE_INT else 0):
            raise ConfigError(f"{key} must be {'>= 1' if key in POSITIVE_INT else '>= 0'}, got {value}")
    for key in POSITIVE_FLOAT + NONNEG_FLOAT:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        cfg[key] = float(value)
        if value < 0 or (key in POSITIVE_FLOAT and value == 0):
            raise ConfigError(f"{key} must be {'> 0' if key in POSITIVE_FLOAT else '>= 0'}, got {value}")
    if not isinstance(cfg["lopt_config"], dict):
        raise ConfigError(f"lopt_config must be a mapping of constructor arguments, got {cfg['lopt_config']!r}")
    if not isinstance(cfg["init_from"], str):
        raise ConfigError(f"init_from must be a path (or empty), got {cfg['init_from']!r}")
    if not isinstance(cfg["suite"], str) or not cfg["suite"]:
        raise ConfigError(f"suite must be a non-empty string, got {cfg['suite']!r}")
    if not (isinstance(cfg["freeze"], list) and all(isinstance(n, str) and n for n in cfg["freeze"])):
        raise ConfigError(f"freeze must be a list of metanetwork parameter names, got {cfg['freeze']!r}")
    if not isinstance(cfg["inject_nan_steps"], list):
        raise ConfigError("inject_nan_steps must be a list of outer steps")
    if cfg["inner_steps_max"] and cfg["inner_steps_max"] < cfg["inner_steps"]:
        raise ConfigError(f"inner_steps_max ({cfg['inner_steps_max']}) must be 0 or >= inner_steps "
                          f"({cfg['inner_steps']})")
    for key in ("second_order", "progress", "batch_runs"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key} must be true or false, got {cfg[key]!r}")
    return cfg


# Keys that may change when a run is resumed without changing what it computes
# (or that obviously mean "continue longer" / "run elsewhere").
RESUMABLE_OVERRIDES = ("outer_steps", "checkpoint_every", "eval_every", "eval_steps", "log_every",
                       "stop_after", "progress", "device", "threads", "out", "inject_nan_steps",
                       "batch_runs")   # the same estimate, computed with fewer, larger passes

"""Configs from overrides with Hydra's compose API and override grammar, in this process: what
the sweep planner and the training CLI's pre-check use. Every Hydra error becomes one
`ConfigError` line `key=value: why` (an unknown option lists the choices; an unknown key names
the nearest one).

    with Composer() as c:
        points = c.grid(["sweep=toy", "optim.h=1e-3,3e-3"])   # the preset's grid x the overrides
        cfgs = [c.compose(p) for p in points]
"""

from __future__ import annotations

import copy
import difflib
import re

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, open_dict

from .. import ROOT
from ..errors import ConfigError

CONF_DIR = str(ROOT / "conf")
CONFIG_NAME = "train"


# the names other code uses for this pipeline's keys (the paper's: h, beta, rho, eps), wherever typed
ALIASES = {
    "lr": "optim.h", "learning_rate": "optim.h", "step_size": "optim.h",
    "beta1": "optim.beta", "beta2": "optim.rho", "betas": "optim.beta and optim.rho",
    "epsilon": "optim.eps", "adam_eps": "optim.eps",
    "epochs": "train.max_steps (full batch: one step per epoch)", "steps": "train.max_steps",
    "max_steps": "train.max_steps", "iterations": "train.max_steps",
    "batch_size": "train.micro_batch (memory only: every step uses all training examples)",
}


def _keys(node, prefix="") -> list[str]:
    out = []
    for k in node:
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(node[k], DictConfig):
            out += _keys(node[k], path + ".")
    return out


class Composer:
    """A Hydra context for composing many configs (one initialisation for all of them)."""

    def __enter__(self):
        self._composed: dict[tuple, DictConfig] = {}  # config groups' overrides -> their config (_by_values)
        self._ctx = initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    # -- the override grammar ------------------------------------------------------------------
    def parse(self, overrides: list[str]):
        loader = GlobalHydra.instance().config_loader()
        parser = OverridesParser.create(config_loader=loader)
        for o in overrides:  # one at a time, so that the error names the culprit
            try:
                parser.parse_overrides([o])
            except OverrideParseException as e:
                raise ConfigError(f"{o}: not a valid override ({str(e).splitlines()[0]})") from None
        return parser.parse_overrides(list(overrides))

    def grid(self, overrides: list[str]) -> list[list[str]]:
        """Every point of the grid: the sweep preset's `hydra.sweeper.params` (if `sweep=<name>`
        is among the overrides) times the sweeps among `overrides` (`k=a,b`); a plain override
        of a swept key replaces its values. Each point is a complete list of overrides."""
        parsed = self.parse(overrides)
        plain = [o.input_line for o in parsed if not o.is_sweep_override()]
        base = self.compose(plain, hydra=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
        try:
            points = BasicSweeper.split_arguments(self.parse(params + list(overrides)), None)[0]
        except HydraException as e:
            raise ConfigError(f"{' '.join(overrides)}: {str(e).splitlines()[0]}") from None
        return [list(p) for p in points]

    # -- composition ---------------------------------------------------------------------------
    def compose(self, overrides: list[str], hydra: bool = False) -> DictConfig:
        """The job's config for `overrides` (without the `hydra` node unless `hydra`)."""
        parsed = self.parse(overrides)  # a syntax error names its override
        if not hydra:
            cfg = self._by_values(parsed)
            if cfg is not None:
                return cfg
        try:
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides),
                                return_hydra_config=hydra)
        except MissingConfigException as e:
            raise self._missing(e, overrides) from None
        except HydraException as e:
            raise self._error(e, overrides) from None
        if not hydra and "hydra" in cfg:
            with open_dict(cfg):
                del cfg["hydra"]
        return cfg

    def _by_values(self, parsed) -> DictConfig | None:
        """The grid's shortcut: the points of a sweep differ in plain values (`optim.h=1e-3`), so
        the config of the other overrides (config groups, `+`/`~`, the preset) is composed by
        Hydra once and the values are applied to a copy of it by Hydra's own step for them
        (ConfigLoaderImpl._apply_overrides_to_config, what compose runs after the defaults
        list): the same config, about 100 ms less per point. None (compose in full, which also
        words any error) when a value does not apply cleanly."""
        repo = GlobalHydra.instance().config_loader().repository
        values, others = [], []
        for o in parsed:
            plain = not (o.is_sweep_override() or o.is_hydra_override() or o.is_add() or o.is_delete()
                         or o.is_force_add() or o.package is not None)
            key = o.key_or_group
            plain = plain and not (repo.group_exists(key) or repo.group_exists(key.replace(".", "/")))
            (values if plain else others).append(o)
        cache = self._composed
        base_key = tuple(o.input_line for o in others)
        if base_key not in cache:
            try:
                cache[base_key] = self.compose(list(base_key), hydra=True)
            except ConfigError:
                return None
            with open_dict(cache[base_key]):
                del cache[base_key]["hydra"]
        cfg = copy.deepcopy(cache[base_key])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except Exception:
            return None
        return cfg

    @staticmethod
    def _find(overrides, key: str) -> str:
        for o in overrides:
            if o.lstrip("+~").split("=", 1)[0].replace("/", ".") in (key, key.replace("/", ".")):
                return o
        return key

    def _missing(self, e: MissingConfigException, overrides) -> ConfigError:
        missing = e.missing_cfg_file or ""
        if "/" in missing and e.options is not None:
            group, value = missing.rsplit("/", 1)
            return ConfigError(f"{group}={value}: unknown option; available: {', '.join(sorted(e.options))}")
        return ConfigError(str(e).splitlines()[0])

    def _unknown_key(self, key: str, overrides) -> ConfigError:
        """`optim.betta=0.9: unknown key; did you mean optim.beta?`, or the keys there are."""
        culprit = self._find(overrides, key)
        try:
            known = _keys(hydra_compose(config_name=CONFIG_NAME, overrides=[o for o in overrides if o != culprit]))
        except HydraException:
            known = _keys(hydra_compose(config_name=CONFIG_NAME))
        group, _, leaf = key.rpartition(".")
        alias = ALIASES.get(leaf.lstrip("+").lower())
        if alias and not alias.startswith(key + " ") and alias != key:
            return ConfigError(f"{culprit}: unknown key; this pipeline calls it {alias}")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
        if not siblings and group in known:  # a value (train.loss=auto), not a group of keys
            hint = " (a loss, model or dataset of your own: docs/custom.md)" if leaf == "_target_" else ""
            return ConfigError(f"{culprit}: {group} holds a value, not keys; +{culprit.lstrip('+')} replaces the "
                               f"value by keys{hint}")
        near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)
        if near == [leaf]:  # a key of the default group, not of the one another override chose
            return ConfigError(f"{culprit}: unknown key for the {group or 'config'} chosen by the other overrides")
        if near:
            return ConfigError(f"{culprit}: unknown key; did you mean {group + '.' if group else ''}{near[0]}?")
        where = f"{group} has" if group else "top-level keys are"
        return ConfigError(f"{culprit}: unknown key; {where}: {', '.join(siblings)} "
                           f"(+{culprit.lstrip('+')} adds a new key)")

    def _error(self, e: HydraException, overrides) -> ConfigError:
        msg = str(e)
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            return self._unknown_key(m.group(1), overrides)
        m = re.match(r"Ambiguous value for argument '([^']+)'", msg)
        if m:
            return ConfigError(f"{m.group(1)}: a grid of values; sweep it with `make sweep EXTRA=...` "
                               "or `python -m pipeline.train -m ...`")
        return ConfigError(msg.splitlines()[0])


def compose(overrides: list[str]) -> DictConfig:
    """One config, in a Hydra context of its own."""
    with Composer() as c:
        return c.compose(overrides)

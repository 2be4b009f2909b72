"""One redaction for everything the pipeline writes or sends: config.yaml, plan.json, the wandb
config, provenance.json (the command line) and code-<attempt>.diff. A credential given on the
command line (`+logger.api_key=...`), read from the environment into a config
(`${oc.env:HF_TOKEN}`) or carried in a URL (`https://user:pass@host`) becomes `***`.

What counts as a credential: a key whose last word is `key`, `api_key`, `token`, `secret`,
`password`, `passwd`, `auth` or `credential(s)` (`logger.api_key`, `access_token`,
`aws_secret_access_key`; not `tokenizer` or `max_tokens`), the value of an environment-variable
interpolation, and the password of a URL."""

from __future__ import annotations

import re

MASK = "***"
SECRET_NAME = re.compile(r"(?i)(^|[_.-])(api[_-]?key|key|token|secret|secret[_-]access[_-]key|password|passwd|auth|"
                         r"credentials?)$")
URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@")
ASSIGNMENT = re.compile(r"(?i)\b([\w.+-]*(api[_-]?key|token|secret|password|passwd)\s*[=:]\s*)(['\"]?)[^\s'\",]+")
FLAG = re.compile(r"(?i)^--?[\w.-]*(api[_-]?key|token|secret|password|passwd)$")


def secret_name(key) -> bool:
    return isinstance(key, str) and bool(SECRET_NAME.search(key))


def text(s: str) -> str:
    """Free text (a diff, a log line): URL passwords and `...key = value` assignments masked."""
    s = URL_PASSWORD.sub(rf"\g<1>{MASK}@", s)
    return ASSIGNMENT.sub(rf"\g<1>\g<3>{MASK}", s)


def argv(args: list[str]) -> list[str]:
    """A command line: `...key=value` overrides and `--api-key value` pairs masked."""
    out, hide = [], False
    for a in args:
        if hide:
            out.append(MASK)
            hide = False
            continue
        name, eq, _ = a.partition("=")
        if eq and secret_name(name.lstrip("+~").rsplit(".", 1)[-1]):
            out.append(f"{name}={MASK}")
        else:
            hide = bool(FLAG.match(a))
            out.append(text(a))
    return out


def obj(value, key=None):
    """A JSON-like value (a config as a container): every value under a credential's name masked,
    every string's URL passwords masked."""
    if secret_name(key) and value not in (None, "", MASK) and not isinstance(value, (dict, list, bool)):
        return MASK
    if isinstance(value, dict):
        return {k: obj(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [obj(v) for v in value]
    return URL_PASSWORD.sub(rf"\g<1>{MASK}@", value) if isinstance(value, str) else value


def env_paths(cfg) -> list[str]:
    """The dotted keys of `cfg` (a DictConfig) whose value is an environment-variable interpolation."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    found = []

    def walk(node, prefix):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
        for k in keys:
            path = f"{prefix}{k}"
            if path == "hydra":  # Hydra's own node (return_hydra_config): not the run's config
                continue
            child = node._get_node(k)
            if isinstance(child, (DictConfig, ListConfig)):
                walk(child, path + ".")
            elif OmegaConf.is_interpolation(node, k) and "oc.env" in str(child._value()):
                found.append(path)
    walk(cfg, "")
    return found


def config(cfg) -> dict:
    """A DictConfig as the container the pipeline writes: resolved, credentials and the values of
    environment-variable interpolations masked."""
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    for path in env_paths(cfg):
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = MASK
    return obj(out)


_exported: dict[str, str] = {}  # credential value -> the environment variable that carries it to jobs


def for_job(cfg):
    """(a copy of `cfg` with every credential given as a literal value masked, {dotted key:
    environment variable}): what a job's pickle may hold. The values go into this process's
    environment (`ADAM_CREDENTIAL_<n>`), which the jobs inherit (submitit's local executor;
    sbatch's default `--export=ALL`); `restore` puts them back in the job. Interpolations such
    as `${oc.env:HF_TOKEN}` stay unresolved in the pickle and resolve in the job."""
    import os

    from omegaconf import OmegaConf

    found = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}{k}"
                if isinstance(v, (dict, list)):
                    walk(v, path + ".")
                elif secret_name(k) and v not in (None, "", MASK) and not isinstance(v, bool) and \
                        not (isinstance(v, str) and "${" in v):
                    found[path] = str(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
    walk(OmegaConf.to_container(cfg, resolve=False), "")
    if not found:
        return cfg, {}
    out, names = cfg.copy(), {}
    for path, value in found.items():
        if value not in _exported:
            _exported[value] = f"ADAM_CREDENTIAL_{len(_exported)}"
            os.environ[_exported[value]] = value
        names[path] = _exported[value]
        OmegaConf.update(out, path, MASK, merge=False)
    return out, names


def restore(cfg, names: dict):
    """`cfg` (from a job's pickle) with the credentials `for_job` masked taken back from the
    environment; ConfigError naming the key when the job's environment lacks one."""
    import os

    from omegaconf import OmegaConf

    from ..errors import ConfigError

    if not names:
        return cfg
    out = cfg.copy()
    for path, var in names.items():
        if var not in os.environ:
            raise ConfigError(f"{path}: the job's environment lacks {var}, which carries this credential from the "
                              "submitting process (a Slurm profile with --export=NONE drops it; use the default "
                              "--export=ALL, or put the credential in the environment of the job)")
        OmegaConf.update(out, path, os.environ[var], merge=False)
    return out

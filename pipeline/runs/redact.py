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

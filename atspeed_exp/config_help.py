"""``python run.py --help``: the config groups and one line per key with its ``# (type) meaning`` comment.

The comments live only in the YAML files under ``conf/`` (the composed config has none), so the key lines are read
from the files themselves: ``config.yaml``'s own keys and, for every group, the option selected on the command line
(or by the defaults list). Hydra's help template (``hydra.help.template`` in ``conf/hydra/default.yaml``) calls
them through the ``atspeed_keys`` resolver, which ``run.py`` registers before Hydra starts. Only the standard
library and omegaconf here: the help must come up without loading torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESOLVER = "atspeed_keys"
SKIPPED_GROUPS = ("hydra", "experiment")  # Hydra's own settings; experiments only change other keys

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")
_COMMENT = re.compile(r"(^|\s)#\s?(?P<text>.*)$")


def yaml_keys(path: Path, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, value as written, comment) for every key of a YAML config file, nested keys included; a comment
    continued on the following comment-only lines (indented after the ``#``) is joined. ``defaults`` is skipped."""
    out: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    last_had_comment = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped[1:]
            if last_had_comment and out and text.startswith("  "):  # an aligned continuation of the last comment
                name, value, comment = out[-1]
                out[-1] = (name, value, f"{comment} {text.strip()}")
            else:
                last_had_comment = False
            continue
        match = _KEY.match(line)
        if not match:
            last_had_comment = False
            continue
        indent, key, rest = len(match["indent"]), match["key"], match["rest"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        comment_match = _COMMENT.search(rest)
        value = rest[: comment_match.start()].strip() if comment_match else rest.strip()
        comment = comment_match["text"].strip() if comment_match else ""
        parents = [k for _, k in stack]
        if (parents or [key])[0] != "defaults":
            out.append((".".join([*([prefix] if prefix else []), *parents, key]), value, comment))
        if not value:
            stack.append((indent, key))
        last_had_comment = bool(comment)
    return out


def _selected(conf_dir: Path, choices: dict[str, Any] | None) -> dict[str, str]:
    """group -> option file, in the order of ``config.yaml``'s defaults list: the command line's choices where
    given, else the defaults."""
    selected: dict[str, str] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            selected.update({str(g): str(o) for g, o in entry.items() if o is not None})
    selected.update({str(g): str(o) for g, o in (choices or {}).items() if o is not None})
    return {g: o for g, o in selected.items() if "/" not in g and g not in SKIPPED_GROUPS}


def key_help(choices: dict[str, Any] | None = None, conf_dir: Path = CONF_DIR) -> str:
    """The key lines of ``--help``: top-level keys, then one block per group naming the option shown."""

    def block(keys: list[tuple[str, str, str]]) -> list[str]:
        width = max((len(name) + len(value) for name, value, _ in keys), default=0) + 3
        lines = []
        for name, value, comment in keys:
            left = f"  {name}={value}" if value else f"  {name}:"
            lines.append(f"{left:{width}s} {comment}".rstrip())
        return lines

    lines = block([k for k in yaml_keys(conf_dir / "config.yaml")])
    for group, option in _selected(conf_dir, choices).items():
        path = conf_dir / group / f"{option}.yaml"
        if not path.is_file():
            continue
        keys = [k for k in yaml_keys(path, prefix=group) if not k[0].endswith("._target_")]
        lines += ["", f"{group} ({group}={option}, conf/{group}/{option}.yaml):", *block(keys)]
    return "\n".join(lines)


def register_help_resolver() -> None:
    """``${atspeed_keys:${hydra.runtime.choices}}`` in Hydra's help template. ``$`` is doubled because Hydra passes
    the template through ``string.Template`` (values such as ``${decoding.beam_size}`` would read as placeholders)."""
    if OmegaConf.has_resolver(RESOLVER):
        return

    def resolve(choices: Any = None) -> str:
        plain = OmegaConf.to_container(choices) if choices is not None and not isinstance(choices, dict) else choices
        return key_help(plain).replace("$", "$$")

    OmegaConf.register_new_resolver(RESOLVER, resolve)

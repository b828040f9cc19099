"""Reading YAML a user (or an attacker) wrote: recipes, ablation files, dataset specs, run configs.

`yaml.safe_load` never runs code, but it still accepts what a recipe must not hold:
- aliases that expand exponentially ("billion laughs": nine lines that stand for 10^9 strings; the
  loaded object shares them, but anything that walks, copies or prints it does not);
- the same key twice in one mapping (YAML keeps the last one silently: a typo'd copy of `lr:` wins);
- nesting deep enough to exhaust Python's recursion limit;
- bytes that are not UTF-8, and syntax errors that PyYAML reports over 4-7 lines.
Every one of these is a single-line `ConfigError` naming the file, line and column, raised in well
under a second (the alias check counts the expanded nodes on the composed graph with memoisation,
before anything is constructed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from maskformer_cli.errors import UserError

# A real recipe has a few hundred nodes; the largest file this project writes (an ablation file with
# its variants) a few thousand. 100k expanded nodes leaves room for any honest file and refuses the
# exponential ones at once.
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64


class YAMLInputError(UserError, ValueError):
    """A YAML file or value that cannot be read safely; the message is one line naming where."""


def _where(source: str, mark: Any) -> str:
    if mark is None:
        return source
    return f"{source}:{mark.line + 1}:{mark.column + 1}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the mapping constructor sees every key, with its line)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges are resolved by flatten_mapping; their keys may be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class say so
                break
            if first is not None:
                raise YAMLInputError(
                    f"{self._source}:{key_node.start_mark.line + 1}: duplicate key '{key}' "
                    f"(first at line {first.line + 1}); YAML would silently keep the last one"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    _source = "<yaml>"


def _check_size(root: yaml.Node, source: str) -> None:
    """Refuse graphs whose alias-expanded size or depth is out of bounds (memoised: linear in the file)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise YAMLInputError(f"{_where(source, node.start_mark)}: nested more than {MAX_DEPTH} levels deep")
        known = sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            total = 1
        if total > MAX_EXPANDED_NODES:
            raise YAMLInputError(
                f"{_where(source, node.start_mark)}: aliases expand to more than {MAX_EXPANDED_NODES:,} values "
                f"(a 'billion laughs' construct?); write the values out instead"
            )
        sizes[id(node)] = total
        return total

    size(root, 0)


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """Parse YAML text strictly (see module docstring); None for an empty document."""
    loader = _StrictLoader(text)
    loader._source = source
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLInputError(f"{source}: nested too deeply to read") from None
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(str(x) for x in (e.context, e.problem) if x) or "invalid YAML"
        raise YAMLInputError(f"{_where(source, mark)}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise YAMLInputError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """`load_yaml` of a file's text; a file that is not UTF-8 is one line with the byte offset."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise YAMLInputError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM from Windows editors is fine
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YAMLInputError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                             f"save the file as UTF-8") from None
    return load_yaml(text, str(p))

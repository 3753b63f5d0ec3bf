"""The TensorRT-LLM API surface Kiln calls, read from a TensorRT-LLM source tree with `ast` (never
imported): what each module exports, the fields and method parameters of the classes Kiln constructs,
enum members, and trtllm-serve's options. Written as the JSON that
tests/unit/engine_server/test_tensorrt_llm_api.py checks Kiln's calls against.

    python tools/trtllm_api_surface.py GIT_DIR v1.0.0 > tests/unit/engine_server/trtllm_api_surface.json
    python tools/trtllm_api_surface.py --src SITE_PACKAGES_OR_CHECKOUT > ...

GIT_DIR is a clone (or bare mirror) of github.com/NVIDIA/TensorRT-LLM; files are read with `git show`.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

LLM_PY = "tensorrt_llm/llmapi/llm.py"
LLM_ARGS_PY = "tensorrt_llm/llmapi/llm_args.py"

# Module -> the file whose top-level names (defined or imported) it exports.
EXPORTS = {
    "tensorrt_llm": "tensorrt_llm/__init__.py",
    "tensorrt_llm._tensorrt_engine": "tensorrt_llm/_tensorrt_engine/__init__.py",
    "tensorrt_llm.llmapi": "tensorrt_llm/llmapi/__init__.py",
}
# Public name -> (file, class, the pydantic model its **kwargs are validated against, or None).
CLASSES: dict[str, tuple[str, str, str | None]] = {
    "tensorrt_llm._tensorrt_engine.LLM": (LLM_PY, "_TrtLLM", "TrtLlmArgs"),
    "tensorrt_llm.LLM": (LLM_PY, "LLM", "TorchLlmArgs"),
    "TrtLlmArgs": (LLM_ARGS_PY, "TrtLlmArgs", None),
    "TorchLlmArgs": (LLM_ARGS_PY, "TorchLlmArgs", None),
    "tensorrt_llm.llmapi.KvCacheConfig": (LLM_ARGS_PY, "KvCacheConfig", None),
    "tensorrt_llm.llmapi.BuildConfig": ("tensorrt_llm/builder.py", "BuildConfig", None),
    "tensorrt_llm.llmapi.QuantConfig": ("tensorrt_llm/models/modeling_utils.py", "QuantConfig", None),
}
ENUMS = {"tensorrt_llm.llmapi.QuantAlgo": ("tensorrt_llm/quantization/mode.py", "QuantAlgo")}
# Command -> (file, the click command's function).
COMMANDS = {"trtllm-serve": ("tensorrt_llm/commands/serve.py", "serve")}
VERSION_PY = "tensorrt_llm/version.py"

Reader = Callable[[str], str]


def git_reader(git_dir: Path, ref: str) -> Reader:
    def read(path: str) -> str:
        return subprocess.run(
            ["git", "--git-dir", str(git_dir), "show", f"{ref}:{path}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    return read


def dir_reader(root: Path) -> Reader:
    return lambda path: (root / path).read_text()


def exported_names(tree: ast.Module) -> list[str]:
    """Top-level names a module binds: definitions, assignments and imports (with their `as` names)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return sorted(n for n in names if n != "__all__")


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _lineage(name: str, classes: dict[str, ast.ClassDef]) -> list[ast.ClassDef]:
    """The class and its bases defined in the same file, most derived first (each once)."""
    out: list[ast.ClassDef] = []
    todo = [name]
    while todo:
        cls = classes.get(todo.pop(0))
        if cls is None or cls in out:
            continue
        out.append(cls)
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return out


def _is_classvar(annotation: ast.expr) -> bool:
    target = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return isinstance(target, ast.Name | ast.Attribute) and ast.unparse(target).endswith("ClassVar")


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
    if a.vararg is not None:
        names.append("*" + a.vararg.arg)
    if a.kwarg is not None:
        names.append("**" + a.kwarg.arg)
    return names


def class_surface(tree: ast.Module, name: str, kwargs_model: str | None) -> dict[str, Any]:
    """Fields (annotated class attributes) and method parameters of `name`, its same-file bases included."""
    lineage = _lineage(name, _classes(tree))
    if not lineage:
        raise SystemExit(f"class {name} not found")
    fields: set[str] = set()
    methods: dict[str, list[str]] = {}
    for cls in reversed(lineage):  # base first, so an override's signature wins
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if not node.target.id.startswith("_") and not _is_classvar(node.annotation):
                    fields.add(node.target.id)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                not node.name.startswith("_") or node.name == "__init__"
            ):
                methods[node.name] = _params(node)
    out: dict[str, Any] = {"defined_as": f"{lineage[0].name}", "fields": sorted(fields), "methods": methods}
    if kwargs_model is not None:
        out["kwargs_model"] = kwargs_model
    return out


def enum_members(tree: ast.Module, name: str) -> list[str]:
    cls = _classes(tree).get(name)
    if cls is None:
        raise SystemExit(f"enum {name} not found")
    return sorted(
        t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    )


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if isinstance(node, ast.Dict):  # an alias table {"trt": "tensorrt"}: the aliases are accepted too
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


def command_surface(tree: ast.Module, function: str) -> dict[str, Any]:
    """A click command's arguments, option flags and, where literal, each option's choices."""
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if fn is None:
        raise SystemExit(f"command function {function} not found")
    arguments: list[str] = []
    options: list[str] = []
    choices: dict[str, list[str]] = {}
    for deco in fn.decorator_list:
        if not isinstance(deco, ast.Call):
            continue
        kind = ast.unparse(deco.func).rsplit(".", 1)[-1]
        names = [a.value for a in deco.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if kind == "argument":
            arguments += names
        elif kind == "option":
            flags = [n for n in names if n.startswith("-")]
            options += flags
            for kw in deco.keywords:
                if kw.arg == "type" and isinstance(kw.value, ast.Call) and flags:
                    found = [s for a in kw.value.args for s in _strings(a)]
                    if found:
                        choices[flags[0]] = sorted(found)
    return {"arguments": arguments, "options": sorted(options), "choices": choices}


def version(read: Reader) -> str:
    for node in ast.parse(read(VERSION_PY)).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise SystemExit(f"no __version__ in {VERSION_PY}")


def surface(read: Reader, source: dict[str, str]) -> dict[str, Any]:
    """The whole surface, from files `read` returns by repository path."""
    trees: dict[str, ast.Module] = {}

    def tree(path: str) -> ast.Module:
        if path not in trees:
            trees[path] = ast.parse(read(path), filename=path)
        return trees[path]

    return {
        "release": version(read),
        "source": source,
        "modules": {m: exported_names(tree(p)) for m, p in EXPORTS.items()},
        "classes": {n: class_surface(tree(p), c, k) for n, (p, c, k) in CLASSES.items()},
        "enums": {n: enum_members(tree(p), c) for n, (p, c) in ENUMS.items()},
        "commands": {n: command_surface(tree(p), f) for n, (p, f) in COMMANDS.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("git_dir", nargs="?", type=Path, help="a clone or bare mirror of NVIDIA/TensorRT-LLM")
    ap.add_argument("ref", nargs="?", help="tag or commit, e.g. v1.0.0")
    ap.add_argument(
        "--src", type=Path, help="instead: a directory holding tensorrt_llm/ (e.g. site-packages)"
    )
    args = ap.parse_args(argv)
    if args.src is not None:
        read, source = dir_reader(args.src), {"tree": str(args.src)}
    elif args.git_dir is not None and args.ref is not None:
        commit = subprocess.run(
            ["git", "--git-dir", str(args.git_dir), "rev-parse", f"{args.ref}^{{commit}}"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        read, source = git_reader(args.git_dir, commit), {"ref": args.ref, "commit": commit}
    else:
        ap.error("give GIT_DIR and REF, or --src DIR")
    json.dump(surface(read, source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

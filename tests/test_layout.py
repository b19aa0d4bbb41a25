"""The package's import rules (ARCHITECTURE.md), read from every import in beit/, function-level ones
included: `shared/` imports only `shared/`; `tokenize/` (stage 1) imports `shared/` and itself,
never `train/`; a task folder under `train/` imports `shared/`, `train/`'s own modules (the run
scaffold, the model, plots) and itself, never another task; `train/`'s own modules import no task;
the entry points (`cli.py`, `api.py`, `__init__.py`) import anything."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "beit"
TASKS = sorted(p.name for p in (PACKAGE / "train").iterdir() if p.is_dir() and (p / "__init__.py").exists())


def beit_imports(path: Path) -> set[str]:
    """The beit modules a file imports (`from beit.x import y` counts as beit.x.y when y is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("beit.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("beit"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = PACKAGE.parent / candidate.replace(".", "/")
                names.add(candidate if as_path.with_suffix(".py").exists() or as_path.is_dir() else node.module)
    return names


def allowed(module: str, imported: str) -> bool:
    own = module.split(".")
    target = imported.split(".")
    # the two entry points (the command line and the Python API) may import anything
    if len(target) == 1 or own[1] in ("cli", "__main__", "api", "__init__") or target[1] == "shared":
        return True
    if own[1] == "shared":
        return False
    if own[1] == "tokenize":
        return target[1] == "tokenize"
    # train/
    if target[1] != "train":
        return False
    target_task = target[2] if len(target) > 2 and target[2] in TASKS else None
    own_task = own[2] if len(own) > 2 and own[2] in TASKS else None
    return target_task is None or target_task == own_task


def test_the_tasks_are_folders_under_train():
    assert TASKS == ["classify", "pretrain", "segment", "tokenizer"]


def test_every_import_in_the_package_follows_the_layout():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for imported in sorted(beit_imports(path)):
            if not allowed(module, imported):
                broken.append(f"{module} imports {imported}")
    assert not broken, "\n".join(broken)


def test_the_rule_catches_what_it_forbids():
    assert not allowed("beit.shared.store", "beit.train.model")
    assert not allowed("beit.tokenize.stage1", "beit.train.scaffold")
    assert not allowed("beit.train.segment.predict", "beit.train.classify.data")
    assert not allowed("beit.train.scaffold", "beit.train.pretrain.data")
    assert allowed("beit.train.segment.predict", "beit.train.segment.inference")
    assert allowed("beit.train.classify.finetune", "beit.train.scaffold")
    assert allowed("beit.tokenize.stage1", "beit.shared.store")

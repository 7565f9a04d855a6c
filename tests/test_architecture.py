"""The core (decoding, losses, metrics) depends on torch only; frameworks live at the edges (STYLE.md)."""

import subprocess
import sys

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "transformers", "peft")


@pytest.mark.parametrize(
    "module",
    ["atspeed_exp.decoding.beam_search", "atspeed_exp.decoding.trie", "atspeed_exp.decoding.verify",
     "atspeed_exp.decoding.drafters", "atspeed_exp.metrics", "atspeed_exp.losses", "atspeed_exp.models.sasrec",
     "atspeed_exp.reporting"]
    + (["atspeed_exp.decoding.speculative"] if __import__("importlib").util.find_spec("atspeed_exp.decoding.speculative") else []),
)
def test_core_module_imports_no_framework(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


# the decoding core's layers: shared tree state below drafters and verification rules, the engine above both
LAYERS = {
    "atspeed_exp.decoding.tree": ("atspeed_exp.decoding.drafters", "atspeed_exp.decoding.verify",
                                  "atspeed_exp.decoding.speculative"),
    "atspeed_exp.decoding.drafters": ("atspeed_exp.decoding.verify", "atspeed_exp.decoding.speculative"),
    "atspeed_exp.decoding.verify": ("atspeed_exp.decoding.drafters", "atspeed_exp.decoding.speculative"),
}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_decoding_layer_imports_only_the_layers_below(module):
    code = (
        f"import sys, {module}\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({LAYERS[module]!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_streaming_metrics_import_only_torch_and_torchmetrics():
    """``metrics/streaming.py`` sits in the core too, but importing torchmetrics pulls in transformers when it is
    installed, so its own imports are checked instead of ``sys.modules``."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "atspeed_exp" / "metrics" / "streaming.py"
    tree = ast.parse(source.read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"__future__", "torch", "torchmetrics", "atspeed_exp"}, roots
    own = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
           and node.module and node.module.startswith("atspeed_exp")}
    assert all(name.startswith("atspeed_exp.metrics.") for name in own), own


def test_no_test_waits_on_a_fixed_wall_clock_timeout():
    """A fixed timeout fails a correct test on a loaded machine; tests wait for the work itself."""
    import re
    from pathlib import Path

    pattern = re.compile(r"timeout(_s)?\s*=\s*\d")
    found = [f"{path.name}:{n}" for path in sorted(Path(__file__).parent.glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, f"fixed wall-clock timeouts in tests: {found}"

"""Architecture: a new rule is one class plus one registry entry (the cost model measures it with no
edits to cost.py), and the package's import graph has no cycle and no import from a lower layer
to a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import locosnn.rules as rules_pkg
from locosnn.cost import DEFAULT_METRICS, StepProbe, update_stages
from locosnn.encoding import encode
from locosnn.losses import output_error
from locosnn.network import SpikingNetwork
from locosnn.rules import RULES, FeedbackRule, LearningRule, PerturbationRule, make_rule, register_rule
from locosnn.rules.base import StepReport, accumulate

# ---------------------------------------------------------------------------------------------
# a toy rule: one file's worth of code, registered through the public registry
# ---------------------------------------------------------------------------------------------


class ToyDFA(FeedbackRule):
    """DFA without time: the output error reaches each hidden layer through a fixed random B_l,
    one forward pass with a hook. Declares its family; nothing in cost.py knows about it."""

    name = "toy-dfa"
    supports_conv = False

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.B: list[torch.Tensor] = []

    def init_feedback(self, network: SpikingNetwork) -> None:
        self.B = [torch.randn(network.layers[li].weight.shape[0], network.n_out, generator=self.generator)
                  for li in range(network.depth - 1)]

    def state_dict(self):
        return {"generator": self.generator.get_state(), "B": [b.clone() for b in self.B]}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])
        self.B = [b.clone() for b in state["B"]]

    @torch.no_grad()
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        if not self.B:
            self.init_feedback(network)
        out = network.run(x_seq).out
        e = output_error(out, y, self.loss) / len(y)
        L = network.depth
        grads: list = [None] * L

        def hook(li, t, x, cur, mem, o, xi):
            f = network.local_derivative(li, cur, mem)
            d = f * (e if li == L - 1 else e @ self.B[li].T)
            accumulate(grads, li, *network.layers[li].outer(d, x))

        network.run(x_seq, hook=hook)
        self.write_grads(network, grads)
        return {"loss": float(self.loss_fn(out, y).mean()), "out": out}


class ToyNP(PerturbationRule):
    """Node perturbation in a few lines: one clean and one noisy recorded pass, G_l = dL xi x^T / sigma^2."""

    name = "toy-np"

    def __init__(self, sigma: float = 0.1, **kw) -> None:
        super().__init__(**kw)
        self.sigma = sigma
        self.generator = torch.Generator().manual_seed(self.seed)

    def perturbed_passes(self, network, x_seq, y):
        from locosnn.network import Noise
        clean = network.run(x_seq, record=True)
        noisy = network.run(x_seq, noise=Noise(self.sigma, "current", "gaussian", self.generator), record=True)
        lc, ln = self.loss_fn(clean.out, y), self.loss_fn(noisy.out, y)
        return clean, noisy, ln - lc, lc

    def estimate(self, network, noisy, dl):
        scale = dl / (self.sigma ** 2 * len(dl))
        grads: list = [None] * network.depth
        for li, layer in enumerate(network.layers):
            for t in range(len(noisy.noise[li])):
                xi = noisy.noise[li][t]
                accumulate(grads, li, *layer.outer(xi * scale.view(-1, *([1] * (xi.dim() - 1))), noisy.inputs[li][t]))
        return grads

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def step(self, network, x_seq, y) -> StepReport:
        clean, noisy, dl, lc = self.perturbed_passes(network, x_seq, y)
        self.write_grads(network, [self.layer_transform(network, clean, li, *g)
                                   for li, g in enumerate(self.estimate(network, noisy, dl))])
        return {"loss": float(lc.mean()), "out": clean.out, "mean_abs_dl": float(dl.abs().mean())}


class ToyOwn(LearningRule):
    """A rule of no family: it states its own stage count."""

    name = "toy-own"

    def step(self, network, x_seq, y) -> StepReport:
        out = network.run(x_seq).out
        return {"loss": float(self.loss_fn(out, y).mean()), "out": out}

    def stage_counts(self, network, x_seq, y):
        return [1] * network.depth


@pytest.fixture
def toy_rules():
    saved = dict(RULES)
    register_rule("toy-dfa", ToyDFA)
    register_rule("toy-np", ToyNP)
    register_rule("toy-own", ToyOwn)
    yield
    RULES.clear()
    RULES.update(saved)


def _net_batch(arch: str):
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    x = torch.rand(8, *net.in_shape)
    return net, encode(x, 4), torch.randint(0, 4, (8,))


def test_a_registered_toy_rule_is_measured_without_editing_cost(toy_rules):
    net, x, y = _net_batch("20-16x3-4")
    assert update_stages(make_rule("toy-dfa"), net, x, y) == 1     # direct feedback: one stage
    assert update_stages(make_rule("toy-np"), net, x, y) == 1      # local perturbation estimate: one stage
    assert update_stages(make_rule("toy-own"), net, x, y) == 1     # no family: the rule answers itself
    for name, passes in (("toy-dfa", 2), ("toy-np", 2)):
        rule = make_rule(name)
        probe = StepProbe(rule, net, x, y)
        row = {m.name: m(probe, rule, net, x, y) for m in (c() for c in DEFAULT_METRICS)}
        assert row["forward_passes"] == passes
        assert row["update_stages"] == 1
        assert row["synops_per_sample"] > 0 and row["rule_state_bytes"] > 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_registry_rejects_non_rules_and_silent_overwrites(toy_rules):
    from locosnn.errors import LocosnnError
    with pytest.raises(LocosnnError):
        register_rule("toy-bad", object)  # type: ignore[arg-type]
    with pytest.raises(LocosnnError):
        register_rule("fa", ToyDFA)


def test_every_registered_rule_declares_a_measurable_family():
    for name, cls in RULES.items():
        fam = [cls.uses_backprop, issubclass(cls, FeedbackRule), issubclass(cls, PerturbationRule)]
        assert sum(fam) == 1, (name, fam)
        assert isinstance(cls.supports_conv, bool)
    assert not RULES["sal"].supports_conv and not RULES["sfdfa"].supports_conv and not RULES["owm"].supports_conv
    assert RULES["fa"].supports_conv and RULES["np"].supports_conv and RULES["bptt"].supports_conv


# ---------------------------------------------------------------------------------------------
# the import graph
# ---------------------------------------------------------------------------------------------

SRC = Path(rules_pkg.__file__).resolve().parents[1]  # .../src/locosnn

#: layers, lowest first; a module may import from its own layer or below, never above
LAYERS: dict[str, int] = {}
for _level, _mods in enumerate([
    # 0: foundations (no model)
    ["_version", "errors", "neurons", "encoding", "losses", "layers", "optim", "seeds", "checkpoint", "provenance",
     "data", "data.*"],
    # 1: the network
    ["network", "testing"],
    # 2: learning rules
    ["rules", "rules.*"],
    # 3: measurements of rules and run settings
    ["diagnostics", "cost", "depth", "config", "distributed", "factory"],
    # 4: training drivers
    ["train", "continual", "continual.*", "sweep"],
    # 5: outputs and stand-alone commands
    ["report", "export", "sal"],
    # 6: the command line and the package facade
    ["cli", "__main__", ""],
]):
    for _m in _mods:
        LAYERS[_m] = _level

#: upward edges accepted, each with its reason (none today). Lazy (function-level) imports count like the others.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _allowed(m: str, d: str) -> bool:
    return (m, d) in ALLOWED_UPWARD



def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package imported anywhere in ``path`` (top level and inside functions)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name[len("locosnn."):] if a.name.startswith("locosnn.") else "" for a in node.names
                       if a.name == "locosnn" or a.name.startswith("locosnn.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if name else []
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "locosnn" or (node.module or "").startswith("locosnn."):
                mod = node.module[len("locosnn."):] if node.module != "locosnn" else ""
            else:
                continue
            for a in node.names:  # "from . import sal" imports the submodule, "from . import __version__" the package
                sub = f"{mod}.{a.name}" if mod else a.name
                targets.append(sub if sub in mods else mod)
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != name:
                out.add(t)
    return out


def _layer(mod: str) -> int:
    if mod in LAYERS:
        return LAYERS[mod]
    parts = mod.split(".")
    for i in range(len(parts) - 1, 0, -1):  # a subpackage's modules sit on the package's layer
        pkg = ".".join(parts[:i])
        if f"{pkg}.*" in LAYERS:
            return LAYERS[f"{pkg}.*"]
    raise AssertionError(f"module locosnn.{mod} has no layer in tests/test_architecture.py LAYERS: add it")


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            if _layer(d) > _layer(m) and not _allowed(m, d):
                bad.append(f"locosnn.{m} (layer {_layer(m)}) imports locosnn.{d} (layer {_layer(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_allowlist_is_not_stale():
    g = _graph()
    stale = [edge for edge in ALLOWED_UPWARD if edge[1] not in g.get(edge[0], set())]
    assert not stale, f"remove these entries from ALLOWED_UPWARD, the imports are gone: {stale}"


def test_no_import_cycle_outside_the_allowlist():
    g = _graph()
    # without the allowlisted upward edges (each is a known, documented exception above)
    g = {m: {d for d in deps if not _allowed(m, d)} for m, deps in g.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_rules_do_not_import_measurements():
    """The specific violations this layering removed stay removed."""
    g = _graph()
    assert "diagnostics" not in g["rules.fa_dfa"]
    assert "sal" not in g["rules.sal"] and "rules.sal_sim" in g["rules.sal"]

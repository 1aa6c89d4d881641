"""SAL: feedback alignment whose feedback matrices learn to mirror the forward weights through
spike timing (spike-based alignment learning, Gierlich et al., arXiv 2503.02642).

Training is exactly FA (:class:`locosnn.rules.fa_dfa.FA`): random feedback B_l in W_l's shape
carries the error down in place of W_l^T, drawn from the same generator as FA's, so an
SAL run and an FA run with the same seed start from the same B. After each training epoch
(every ``sal_every``-th; the trainer's ``end_epoch`` hook) a SAL phase runs
(:func:`locosnn.rules.sal_sim.sal_phase`): the network, with stochastic spiking neurons, carries W_l
bottom-up and B_l top-down, fires driven by its own noise, and an antisymmetric STDP rule on
the feedback synapses moves B_l towards W_l. ``end_epoch`` returns ``{"angle_deg": [...]}``
(angle(B_l, W_l) for l = 1..L-1, logged as ``rule_angle_deg``), measured after the phase.

What the authors did that we do differently (details in :mod:`locosnn.rules.sal_sim`): their SAL phase
ran before each epoch, five times, on a separate sampling network with weights copied from the
trained ANN; ours runs once after each epoch on the trained SNN's weights, rescaled per layer
(``sal_gain``), in discrete time. The phase's RNG is rule state (checkpointed), so a resumed run
reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

from typing import Any, Optional

from ..errors import LocosnnError
from ..network import SpikingNetwork
from ..seeds import SAL_PHASE, rule_generator
from .base import follow
from .fa_dfa import FA
from .sal_sim import _check, sal_phase


class SAL(FA):
    """FA + a spike-based alignment phase on the feedback matrices after each epoch.

    Settings of the SAL phase. Defaults: angle(B, W) 90 -> ~24 deg after one phase at
    784-500-500-10 from random B, ~17 deg after three (~20 s a phase on one CPU thread);
    the previous, faster choice (sal_steps 2000, sal_lr 0.05, sal_batch 32: ~4 s) levels off
    near 40 deg, because the learning rate sets the noise floor of the angle:

    sal_steps     time steps per phase (6000)
    sal_lr        SAL learning rate; the update is lr / (gain * batch) * (STDP sum) per step (0.01);
                  larger: faster alignment, higher noise floor of the angle
    sal_kernel    STDP kernel K: "triangular" max(0, 1 - d/tau) (default) or "exp" exp(-d/tau)
    sal_tau       kernel width in steps (default: sal_tau_ref, so the window ends with refractoriness)
    sal_every     run the phase after every N-th epoch (1); 0 never (then this is FA that logs angles)
    sal_pairing   "nearest" (default: each spike pairs with the partner's last spike) or "all"
    sal_batch     parallel chains of the spiking network (64)
    sal_gain      drive of each layer's weights in the phase, ~per-neuron input std (1.0; from ~1.5 up
                  the W-B loop amplifies itself and B overshoots)
    sal_tau_ref   absolute refractory period of the stochastic neurons, steps (4)
    sal_tau_syn   length of the rectangular PSP, steps (2)
    sal_bias      constant membrane bias of every neuron (0.5)
    deterministic noise-free neurons (spike iff u > 0): the negative control, B does not align
    """

    name = "sal"
    supports_conv = False

    def __init__(self, sal_steps: int = 6000, sal_lr: float = 0.01, sal_kernel: str = "triangular",
                 sal_tau: Optional[float] = None, sal_every: int = 1, sal_pairing: str = "nearest",
                 sal_batch: int = 64, sal_gain: float = 1.0, sal_tau_ref: int = 4, sal_tau_syn: float = 2,
                 sal_bias: float = 0.5, deterministic: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        if self.feedback != "random":
            raise LocosnnError("the sal rule learns its feedback matrices; it needs feedback='random'")
        if sal_steps < 0 or sal_every < 0 or sal_batch < 1:
            raise LocosnnError(f"sal_steps and sal_every must be >= 0 and sal_batch >= 1, got "
                               f"{sal_steps}, {sal_every}, {sal_batch}")
        tau = float(sal_tau_ref) if sal_tau is None else float(sal_tau)
        _check(sal_kernel, sal_pairing, "rect", sal_tau_ref, tau, sal_tau_syn)
        self.sal_steps, self.sal_lr, self.sal_kernel, self.sal_tau = int(sal_steps), float(sal_lr), sal_kernel, tau
        self.sal_every, self.sal_pairing, self.sal_batch = int(sal_every), sal_pairing, int(sal_batch)
        self.sal_gain, self.sal_tau_ref, self.sal_tau_syn = float(sal_gain), int(sal_tau_ref), sal_tau_syn
        self.sal_bias, self.deterministic = float(sal_bias), bool(deterministic)
        self.sal_generator = rule_generator(self.seed, SAL_PHASE)
        self.epochs_seen = 0
        self.last_phase: dict[str, Any] = {}

    def init_feedback(self, network: SpikingNetwork) -> None:
        if any(layer.kind != "linear" for layer in network.layers):
            raise LocosnnError("the sal rule supports fully connected networks only (its SAL phase has no conv "
                               "version); use e.g. --arch 784-500-500-10, or the fa rule for conv networks")
        super().init_feedback(network)

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"sal_generator": self.sal_generator.get_state(), "epochs_seen": self.epochs_seen})
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sal_generator.set_state(state["sal_generator"])
        self.epochs_seen = int(state["epochs_seen"])

    def run_phase(self, network: SpikingNetwork) -> dict[str, Any]:
        """One SAL phase on self.B (in place); returns the phase's rates and duration."""
        if not self.B:
            self.init_feedback(network)
        self.B = follow(self.B, network.layers[0].weight)  # updated in place: on the network's dtype and device
        record: dict[str, Any] = {}
        sal_phase(network, self.B, steps=self.sal_steps, lr=self.sal_lr, kernel=self.sal_kernel, tau=self.sal_tau,
                  pairing=self.sal_pairing, tau_ref=self.sal_tau_ref, tau_syn=self.sal_tau_syn, gain=self.sal_gain,
                  bias=self.sal_bias, batch=self.sal_batch, deterministic=self.deterministic,
                  generator=self.sal_generator, record=record)
        self.last_phase = record
        return record

    def end_epoch(self, network: SpikingNetwork) -> dict[str, Any]:
        if not self.B:
            self.init_feedback(network)
        self.epochs_seen += 1
        if self.sal_every and self.sal_steps and self.epochs_seen % self.sal_every == 0:
            self.run_phase(network)
        return {"angle_deg": self.feedback_angles(network)}

"""locosnn: training spiking neural networks without backpropagation."""
__version__ = "0.1.0"

from .errors import LocosnnError, NonFiniteError  # noqa: E402
from .network import Noise, SpikingNetwork, Trace  # noqa: E402
from .neurons import NeuronConfig  # noqa: E402

__all__ = ["LocosnnError", "NonFiniteError", "Noise", "SpikingNetwork", "Trace", "NeuronConfig", "__version__"]

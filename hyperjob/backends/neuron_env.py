"""The pinned Neuron environments: the package sets the Trainium training stacks run with.

Two products share the package name torch-neuronx and must never be mixed in one venv:

- `XLA` (backend `neuron`): optimum-neuron 0.4.5 is the last release of the PyTorch/XLA training path and pins one
  exact Neuron SDK 2.26 set. The only training path for trn1/trn1n.
- `TORCHNEURON` (backend `torchneuron`): TorchNeuron, the native PyTorch backend of Neuron 2.33 (public beta,
  trn2/trn3 only, Python 3.12-3.14): torch 2.13 with the matching torch-neuronx 2.13.3 family, and the Hugging
  Face versions hyperjob's own train entry is tested with.

This is the only place that names the Neuron pip index and the versions. Stdlib only: `hyperjob plan` and the CLI
import it. The module-level functions are the XLA set's, which the neuron backend's entry and tests use.
"""

from __future__ import annotations

from hyperjob.backends.envspec import (
    CORE_DEPS,
    RECORD_NAME,
    EnvSpec,
    Pin,
    read_record,
    venv_of,
    version_matches,
)

__all__ = [
    "CORE_DEPS", "NEURON_INDEX_URL", "NEURON_SDK", "OPTIMUM_NEURON", "PINS", "PYTHON_VERSIONS", "RECORD_NAME",
    "TORCHNEURON", "XLA", "EnvSpec", "Pin", "installed_versions", "make_record", "mismatch", "plan_rows",
    "read_record", "record_is_current", "requirements", "venv_of", "version_matches",
]  # fmt: skip

NEURON_SDK = "2.26"
NEURON_INDEX_URL = "https://pip.repos.neuron.amazonaws.com"
PYTHON_VERSIONS = ("3.10", "3.11")  # optimum-neuron 0.4.5: Python >=3.10,<3.12
OPTIMUM_NEURON = "0.4.5"

PINS: tuple[Pin, ...] = (
    Pin("optimum-neuron", f"=={OPTIMUM_NEURON}", ("training",)),
    Pin("torch", "==2.8.0.*"),
    Pin("torch-neuronx", "==2.8.0.2.10.16998"),
    Pin("neuronx-distributed", "==0.15.22404"),
    Pin("neuronx-cc", "==2.21.33363.0"),
    Pin("transformers", "~=4.57.1"),
    Pin("peft", "==0.17.0"),
    Pin("trl", "==0.24.0"),
    Pin("accelerate", "==1.8.1"),
    Pin("optimum", "~=2.0.0"),
)

XLA = EnvSpec(
    label=f"optimum-neuron {OPTIMUM_NEURON}'s Neuron {NEURON_SDK} set",
    sdk=NEURON_SDK,
    index_url=NEURON_INDEX_URL,
    python_versions=PYTHON_VERSIONS,
    pins=PINS,
    shown=("optimum-neuron", "torch-neuronx", "neuronx-cc", "transformers"),
    base_python="python3.11",
)

TORCHNEURON_SDK = "2.33"
TORCHNEURON = EnvSpec(
    label=f"TorchNeuron's Neuron {TORCHNEURON_SDK} set",
    sdk=TORCHNEURON_SDK,
    index_url=NEURON_INDEX_URL,
    python_versions=("3.12", "3.13", "3.14"),
    pins=(
        Pin("torch", "==2.13.0"),
        Pin("torch-neuronx", "==2.13.3.0.*"),  # the TorchNeuron family for torch 2.13 (2.14.3.0.* goes with 2.14)
        Pin("neuronx-cc", "==2.28.7631.0"),
        Pin("nki", "==0.7.0"),
        # what hyperjob's train entry is tested with (accelerate >= 1.13 knows MULTI_NEURON)
        Pin("transformers", "~=5.24.0"),
        Pin("peft", "~=0.21.2"),
        Pin("accelerate", "~=1.15.0"),
        Pin("datasets", "~=5.2.0"),
        Pin("safetensors", "~=0.8.0"),
        Pin("huggingface-hub", "~=2.4.0"),
        Pin("tokenizers", "~=0.23.3"),
    ),
    shown=("torch", "torch-neuronx", "neuronx-cc", "transformers"),
    base_python="python3.12",
    extra_index_urls=("https://download.pytorch.org/whl/cpu",),
)

requirements = XLA.requirements
installed_versions = XLA.installed_versions
mismatch = XLA.mismatch
make_record = XLA.make_record
record_is_current = XLA.record_is_current
plan_rows = XLA.plan_rows

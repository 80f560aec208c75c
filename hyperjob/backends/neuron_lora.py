"""LoRA targets on Trainium, checked before anything is queued, with optimum-neuron 0.4.5's own rules.

optimum-neuron fuses gate_proj+up_proj into gate_up_proj always, and q_proj+k_proj+v_proj into qkv_proj when the
model has fewer key/value heads than tensor-parallel ranks (or a count TP does not divide). A LoRA target list that
names only part of a fused group is refused by upstream minutes into the job, after the model has loaded; the
string "all-linear" crashes there outright. Both are caught here instead, and "all-linear" is expanded by us.
tests/neuron_upstream checks these rules against the real `adapt_peft_config_for_model`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyperjob.config.load import ConfigError
from hyperjob.model_facts import ModelFacts

KEY = "lora.target_modules"
ALL_LINEAR = "all-linear"
# The linear layers of a Llama decoder layer, as peft names them (lm_head is never a LoRA target here).
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GATE_UP = ("gate_proj", "up_proj")
QKV = ("q_proj", "k_proj", "v_proj")


def qkv_fused(facts: ModelFacts | None, tp: int) -> bool:
    """Whether upstream fuses q/k/v into one GQA layer; unknown heads count as fused (the stricter rule), except at
    TP 1, where every head count divides and nothing is ever fused."""
    if tp == 1:
        return False
    if facts is None:
        return True
    kv = facts.num_key_value_heads
    return kv < tp or kv % tp != 0


def expand(targets: Sequence[str]) -> tuple[str, ...]:
    """`all-linear` means every linear layer of the decoder; upstream cannot take the string, so we list them."""
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            others = [t for t in targets if t != ALL_LINEAR]
            raise ConfigError([(KEY, f"{ALL_LINEAR!r} already names every linear layer; drop {', '.join(others)}")])
        return LLAMA_LINEARS
    return tuple(targets)


def _partial(group: Sequence[str], targets: Sequence[str], fused: str, why: str) -> str | None:
    named = [t for t in group if t in targets]
    if not named or len(named) == len(group):
        return None
    missing = [t for t in group if t not in targets]
    return (
        f"{', '.join(named)} without {', '.join(missing)}: on Trainium {', '.join(group[:-1])} and {group[-1]} are one "
        f"fused layer ({fused}{why}), so target all of them or none (add {', '.join(missing)}, or remove "
        f"{', '.join(named)})"
    )


def neuron_targets(targets: Sequence[str], facts: ModelFacts | None, tp: int) -> tuple[str, ...]:
    """The target list the Trainium entry gives peft: expanded and checked, or a ConfigError naming the fix."""
    chosen = expand(targets)
    problems = [_partial(GATE_UP, chosen, "gate_up_proj", "")]
    if qkv_fused(facts, tp):
        why = (
            f", because the model's {facts.num_key_value_heads} key/value heads are fewer than tensor={tp}"
            if facts is not None
            else ", assumed while the model's head counts are unknown"
        )
        problems.append(_partial(QKV, chosen, "qkv_proj", why))
    found = [p for p in problems if p]
    if found:
        raise ConfigError([(KEY, p) for p in found])
    return chosen

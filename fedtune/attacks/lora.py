"""Poisoning that touches only a LoRA adapter (``model.transfer = "lora"``): the attacker
trains honestly and sends its honest update of the classifier head, but ``attack.lora_scale``
times its update of the adapter matrices (peft's ``lora_A`` / ``lora_B``). The adapter is where
parameter-efficient fine-tuning moves the encoder, and it is a small share of the update: an
aggregator that judges whole updates sees the head's honest part beside it. -1 flips the
adapter's direction only (sign flipping, Damaskinos et al. 2018, restricted to the adapter),
-10 (the default) boosts the flip, as ``scaling`` does for a whole update. An untargeted attack;
a backdoor under LoRA (``backdoor``) also moves only what trains, the adapter and the head."""

from __future__ import annotations

import numpy as np

from fedtune.attacks.plan import UpdateContext

ADAPTER_MARKERS = (".lora_A.", ".lora_B.")  # peft's names of the adapter matrices


def is_adapter(name: str) -> bool:
    """Whether a travelling tensor is one of the LoRA adapter's matrices."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def adapter_scaled(context: UpdateContext, honest: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """The honest update with its adapter matrices scaled by ``attack.lora_scale``."""
    factor = float(context.settings["lora_scale"])
    return {name: factor * value if is_adapter(name) else value
            for name, value in honest.items()}

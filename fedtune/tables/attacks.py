"""Every poisoning attack fedtune can play, one entry each (``attack.name``).

An attack is played by the attacking clients themselves, inside the client wing
(``fedtune.client.attacking``), so every runtime and a deployment play it alike. An entry says
what the attack acts on (``acts_on``: ``"data"``, the client's training examples before it
trains; ``"update"``, the model it sends after honest training), what a colluder must see
(``sees``: "" = only its own data and update; otherwise the honest updates of its collusion
group in this round, computed by the colluders themselves from their own data, the weaker
assumption of Baruch et al. 2019 and Shejwalkar & Houmansadr 2021), the ``[attack]`` keys it
owns, and its implementation: ``"module:function"``, an update attack
``(context, global, honest) -> sent`` or a data attack building the poisoned examples
(``fedtune.attacks``).

Adding an attack: write its module in ``fedtune/attacks/`` and add one entry here
(``docs/guide/attacks.md`` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key

if TYPE_CHECKING:
    from fedtune.config import Config

ATTACKS_PACKAGE = "fedtune.attacks."
BENIGN_OF_GROUP = ("the honest updates of its collusion group this round (each colluder trains "
                   "every member's data from the round's global model), not other clients'")


@dataclass(frozen=True)
class AttackEntry(Entry):
    """One attack: ``implementation`` is its function ("module:function")."""

    acts_on: str = "update"  # "data" (training examples) or "update" (the model sent)
    sees: str = ""  # what a colluder sees beyond its own update ("" = nothing more)
    backdoor: bool = False  # the run measures its attack success rate on triggered tests
    check: Callable[[Config], None] | None = None

    @property
    def attacks(self) -> bool:
        """Whether anyone attacks under this entry (every entry but ``none``)."""
        return bool(self.acts_on)

    @property
    def needs_benign(self) -> bool:
        """Whether colluders need the round's honest updates of their group."""
        return bool(self.sees)


def _check_lora(config: Config) -> None:
    if config.model.transfer != "lora":
        raise ConfigError(f"attack.name = 'lora_scaling' is not allowed with model.transfer = "
                          f"{config.model.transfer!r}: must be 'lora' (it poisons the adapter)")


SCALE_FACTOR = Key(-10.0, "scaling: an attacker sends x + factor (y - x) for its honestly "
                          "trained model y and the global model x (-10: boosted sign flip)")
ATTACKS: dict[str, AttackEntry] = {
    "none": AttackEntry("no attack: every client is honest", acts_on=""),
    "label_flip": AttackEntry(
        "label flipping (Tolpegin et al. 2020): an attacker trains on its examples with label "
        "y replaced by (num_labels - 1 - y)",
        acts_on="data", implementation=ATTACKS_PACKAGE + "label_flip:flipped_labels"),
    "sign_flip": AttackEntry(
        "sign flipping (Damaskinos et al. 2018; Li et al. 2019): an attacker sends the negated "
        "update x - (y - x)", implementation=ATTACKS_PACKAGE + "scaling:sign_flipped"),
    "scaling": AttackEntry(
        "scaling: an attacker sends x + factor (y - x); with a backdoor this is model "
        "replacement (Bagdasaryan et al. 2020: attack.boost)",
        keys={"scale_factor": SCALE_FACTOR},
        implementation=ATTACKS_PACKAGE + "scaling:scaled"),
    "gaussian": AttackEntry(
        "Gaussian noise (Fang et al. 2020; Blanchard et al. 2017): an attacker sends x + "
        "N(0, std^2 I), its training ignored",
        keys={"noise_std": Key(1.0, "gaussian: standard deviation of each coordinate of the "
                                    "sent update", gt=0)},
        implementation=ATTACKS_PACKAGE + "gaussian:gaussian_update"),
    "alie": AttackEntry(
        "A little is enough (Baruch et al. 2019): every colluder sends mean - z std of its "
        "group's honest updates, coordinate-wise",
        keys={"alie_z": Key(0.0, "alie: z; 0 = the paper's z_max from the clients per round and "
                                 "the attackers among them", ge=0)},
        sees=BENIGN_OF_GROUP, implementation=ATTACKS_PACKAGE + "alie:alie_update"),
    "ipm": AttackEntry(
        "inner-product manipulation (Xie et al. 2020): every colluder sends -epsilon times the "
        "mean of its group's honest updates",
        keys={"ipm_epsilon": Key(0.5, "ipm: epsilon (Xie et al. 2020: 0.1 against Krum, larger "
                                      "against median)", gt=0)},
        sees=BENIGN_OF_GROUP, implementation=ATTACKS_PACKAGE + "ipm:ipm_update"),
    "min_max": AttackEntry(
        "min-max (Shejwalkar & Houmansadr 2021): mean + gamma p, p = -std of the group's honest "
        "updates, gamma the largest keeping the farthest honest update no farther than any two "
        "honest ones are apart",
        sees=BENIGN_OF_GROUP, implementation=ATTACKS_PACKAGE + "min_max:min_max_update"),
    "min_sum": AttackEntry(
        "min-sum (Shejwalkar & Houmansadr 2021): as min-max, bounding the sum of squared "
        "distances to the honest updates by the largest such sum of an honest one",
        sees=BENIGN_OF_GROUP, implementation=ATTACKS_PACKAGE + "min_max:min_sum_update"),
    "backdoor": AttackEntry(
        "backdoor (Bagdasaryan et al. 2020; text: Dai et al. 2019): an attacker adds copies of "
        "its examples carrying a trigger (a phrase put at the start of a text, a pixel pattern "
        "on an image) labelled attack.target_label; attack.boost > 1 scales its update (model "
        "replacement)",
        keys={"target_label": Key(0, "backdoor: the label the trigger flips to", ge=0),
              "trigger": Key("cf mn bb", "backdoor: the phrase put at the start of a poisoned "
                                         "text (images: a 3x3 bright patch in the corner)"),
              "poison_fraction": Key(0.5, "backdoor: share of an attacker's examples of other "
                                          "labels that it adds triggered copies of", gt=0,
                                     le=1),
              "boost": Key(1.0, "backdoor: the attacker sends x + boost (y - x) (model "
                                "replacement: about clients per round / server lr)", gt=0)},
        acts_on="data", backdoor=True,
        implementation=ATTACKS_PACKAGE + "backdoor:triggered_examples"),
    "lora_scaling": AttackEntry(
        "LoRA-only poisoning (model.transfer = 'lora'): an attacker sends its honest head update "
        "but attack.lora_scale times its update of the LoRA adapter matrices",
        keys={"lora_scale": Key(-10.0, "lora_scaling: the factor on the adapter's update (-1: "
                                       "flip it; -10: boosted flip)")},
        check=_check_lora, implementation=ATTACKS_PACKAGE + "lora:adapter_scaled"),
}


def check_attack(config: Config) -> None:
    """Who attacks (exactly one of fraction, count, clients, naming at least one client), and
    the chosen attack's checks that involve other keys."""
    a, n = config.attack, config.data.num_clients
    entry = ATTACKS[a.name]
    if not entry.attacks:
        return
    given = [name for name in ("fraction", "count", "clients") if getattr(a, name)]
    if len(given) != 1:
        raise ConfigError(
            f"attack.name = {a.name!r} needs exactly one of attack.fraction, attack.count or "
            f"attack.clients, got {', '.join(given) or 'none of them'}")
    if a.count > n:
        raise ConfigError(f"attack.count = {a.count} is not allowed: must be <= data.num_clients"
                          f" = {n}")
    if 0 < a.fraction * n < 0.5:
        raise ConfigError(f"attack.fraction = {a.fraction:g} is not allowed with "
                          f"data.num_clients = {n}: must pick at least one client "
                          f"(>= {0.5 / n:g})")
    bad = [c for c in a.clients if not 0 <= c < n]
    if bad or len(set(a.clients)) != len(a.clients):
        raise ConfigError(f"attack.clients = {a.clients!r} is not allowed: must be distinct "
                          f"client ids in 0..{n - 1}")
    if entry.acts_on == "data" and config.data.dataset == "files":
        raise ConfigError(f"attack.name = {config.attack.name!r} is not allowed with "
                          "data.dataset = 'files': must be an update attack (a party's own "
                          "file is its data; poison the file itself)")
    if entry.check is not None:
        entry.check(config)

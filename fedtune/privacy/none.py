"""``privacy.mode = "none"``: no privacy mechanism; the base ``PrivacyMode`` as it is."""

from __future__ import annotations

from fedtune.privacy.mode import PrivacyMode


class NoPrivacy(PrivacyMode):
    """Plain federated training: no clipping, no noise, no accountant."""

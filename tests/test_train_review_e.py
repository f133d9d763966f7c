"""Training, decisions and evaluation as the command line drives them: edges a review found."""

from __future__ import annotations

import numpy as np

from deepwatch.models.decision import Decision


def test_a_bundle_without_a_benign_label_flags_every_record() -> None:
    # an attack-type classifier (no label 'normal') with the threshold decision: its score was
    # max P(label), under 0.5 for records the network was unsure of between three labels or
    # more, and those were let through as normal (a real bundle trained with --decision
    # threshold on KDD attacks alone flagged 0 of 1,579 attack records), while train said
    # "every record scored will be malicious"
    decision = Decision({"labels": ["ipsweep", "neptune", "smurf"],
                         "label_category": ["probe", "dos", "dos"],
                         "categories": ["normal", "probe", "dos", "u2r", "r2l", "unknown"],
                         "policy": "threshold", "threshold": 0.5})
    proba = np.array([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33]], dtype=np.float32)
    cols = decision.apply({"proba": proba})
    assert cols["verdict"].tolist() == [True, True, True]
    assert cols["score"].tolist() == [1.0, 1.0, 1.0]  # 1 - P(normal), P(normal) = 0
    assert cols["attack_type"].tolist() == ["ipsweep", "smurf", "ipsweep"]
    assert cols["category"].tolist() == ["probe", "dos", "probe"]

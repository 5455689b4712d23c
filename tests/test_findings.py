"""Findings are rendered from the values: the verdicts follow the numbers."""
from diffseg_utils.findings import protocol_findings

TABLE = {"grounding": {"seen": 0.6, "unseen": 0.5, "harmonic": 0.55}, "daam": {"seen": 0.3, "unseen": 0.2, "harmonic": 0.24}}


def _rows(syn_seen, syn_unseen, abl_unseen=0.0, ref_seen=0.8):
    return {"grounded": {"seen": syn_seen, "unseen": syn_unseen, "harmonic": 0.0},
            "segmenter_seen": {"seen": 0.5, "unseen": abl_unseen, "harmonic": 0.0},
            "truth_seen": {"seen": ref_seen, "unseen": 0.0, "harmonic": 0.0}}


def test_protocol_two_targets_follow_the_numbers():
    good = protocol_findings(TABLE, _rows(0.6, 0.4))
    assert "0.75× the 0.800" in good and good.count("**not met**") == 0
    low = protocol_findings(TABLE, _rows(0.5, 0.2))
    assert low.count("**not met**") == 2
    # unseen above 0.30 but not above the seen-only floor: not met
    assert protocol_findings(TABLE, _rows(0.6, 0.35, abl_unseen=0.4)).count("**not met**") == 1
    assert "beats every training-free map" in protocol_findings(TABLE)
    assert "Protocol II" not in protocol_findings(TABLE)


def test_token_study_findings_read_the_correlation_and_the_premise():
    from types import SimpleNamespace

    from diffseg_utils.findings import token_study_findings

    def study(cw, eot, r):
        iou = {"class word": cw, "end of text": eot, "start of text": 0.01, "whole image": 0.11}
        return SimpleNamespace(templates=["a {}"], iou={"a {}": iou}, roles=tuple(iou), pairs=30,
                               similarity={"a {}": r})
    broken = token_study_findings(study(0.009, 0.43, 0.99))
    assert "premise fails" in broken and "near 1" in broken
    binds = token_study_findings(study(0.338, 0.346, -0.78))
    assert "as DAAM presumes, level with the end of text token's" in binds and "negative" in binds
    assert "premise fails" not in binds
    assert "follow the word" in token_study_findings(study(0.5, 0.3, 0.1))


def test_fewshot_findings_let_the_paired_interval_decide():
    from diffseg_utils.findings import fewshot_findings
    from diffseg_utils.metrics import PairedDifference

    names = {"d": "ddpm_miou", "u": "untrained_miou", "r": "rgb_miou", "xy": "rgbxy_miou", "p": "paper_t_miou",
             "s": "single_block_miou"}
    mean = {"d": 0.674, "u": 0.239, "r": 0.069, "xy": 0.207, "p": 0.657, "s": 0.650}
    std = dict.fromkeys(mean, 0.01)
    behind = PairedDifference(-0.018, 0.003, -0.023, -0.015, 0, 3, 3)
    crossing = PairedDifference(-0.018, 0.03, -0.05, 0.02, 1, 2, 3)
    assert "0.657, level with the validated choice" in fewshot_findings(mean, std, names, 3)   # means alone
    assert "0.657, below the validated choice" in fewshot_findings(mean, std, names, 3, {"paper_t_miou": behind})
    assert "level with" in fewshot_findings(mean, std, names, 3, {"paper_t_miou": crossing})
    assert "not clearly better" in fewshot_findings(mean, std, names, 3, {"single_block_miou": crossing})

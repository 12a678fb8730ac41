import pytest

from qwen2.train.schedule import learning_rate


def lrs(schedule, **kw):
    return [learning_rate(s, total_steps=100, peak=1.0, warmup_steps=10, schedule=schedule, min_ratio=0.1, **kw)
            for s in range(100)]


def test_warmup_then_cosine_to_the_floor():
    lr = lrs("cosine")
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))  # never rises after warmup
    assert lr[99] == pytest.approx(0.1) and lr[54] == pytest.approx(0.55, abs=0.01)


def test_wsd_holds_then_decays_linearly():
    lr = lrs("wsd", decay_fraction=0.2)
    assert lr[10:80] == [1.0] * 70
    assert lr[99] == pytest.approx(0.1) and lr[89] == pytest.approx(0.55)
    assert lrs("constant")[50:] == [1.0] * 50
    with pytest.raises(ValueError, match="schedule must be one of"):
        learning_rate(0, total_steps=1, peak=1, warmup_steps=0, schedule="linear")


def test_stage_mixture_moves_linearly_to_its_end_weights():
    from qwen2.train.pretrain import _mixture
    from qwen2.train.recipe import StageSpec

    stage = StageSpec(name="hq", steps=5, mixture={"web": 0.8, "code": 0.2}, mixture_end={"web": 0.0, "code": 1.0})
    weights = [_mixture(stage, t, ["code", "web"]) for t in range(5)]
    assert weights[0] == {"code": 0.2, "web": 0.8} and weights[-1] == {"code": 1.0, "web": 0.0}
    assert weights[2]["code"] == pytest.approx(0.6) and weights[2]["web"] == pytest.approx(0.4)
    assert _mixture(StageSpec(name="all", steps=3), 1, ["a", "b"]) == {"a": 1.0, "b": 1.0}  # default: alike

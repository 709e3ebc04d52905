"""The PEFT bake-off's table logic and the parameter count shown before launch (mmdemo.bakeoff)."""

from mmdemo.bakeoff import applicable_methods, mark_pick, method_plan
from mmdemo.models import apply_method, build_classifier, count_parameters


def test_pick_is_the_cheapest_method_within_one_point_of_the_best():
    rows = [{"method": "full", "trainable_params": 4_000_000, "value": 0.95},
            {"method": "lora", "trainable_params": 90_000, "value": 0.942},   # within 1 point (0.008 below)
            {"method": "ia3", "trainable_params": 20_000, "value": 0.93},     # 2 points below: out
            {"method": "bitfit", "trainable_params": 60_000, "value": None}]  # not finished: out
    assert mark_pick(rows) == "lora"
    assert [r["pick"] for r in rows] == [False, True, False, False]
    assert mark_pick([{"method": "x", "trainable_params": 1, "value": None}]) is None


def test_method_plan_counts_what_the_method_trains_and_names_its_layers():
    labels = ["a", "b", "c"]
    plan = method_plan("classification", "test_efficientnet", labels, "lokr")
    clf, _ = build_classifier("test_efficientnet", labels, pretrained=False)
    assert plan["trainable_params"] == count_parameters(apply_method(clf, "lokr", 8, 16))[0]
    assert plan["layers"] and all("conv_pw" in n or "conv_reduce" in n or "conv_expand" in n or "conv_head" in n
                                  for n in plan["layers"])
    assert f"{plan['trainable_params']:,} of" in plan["text"]


def test_bakeoff_skips_the_methods_a_cnn_cannot_take():
    methods, skipped = applicable_methods("classification", "test_efficientnet", ["a", "b"])
    assert set(skipped) == {"adapter", "vpt"} and "vision transformers" in skipped["vpt"]
    assert methods[:4] == ["full", "head", "lora", "bitfit"] and "oft" in methods

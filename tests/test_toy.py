"""The paper's matrix-factorisation experiment keeps its published ordering."""

import json
import math

from reflora_ds.toy import iters_to, run_all


def test_toy_reproduces_the_published_ordering(tmp_path):
    result = run_all(tmp_path)
    runs = {(r["method"], r["lr"]): r for r in result["runs"]}
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "toy.json").read_text()) == json.loads(json.dumps(result))
    for r in result["runs"]:
        assert len(r["loss"]) == 101
    # step 0.03: LoRA diverges, RefLoRA reaches 1e-3 in about a dozen iterations
    assert runs[("lora", 0.03)]["loss"][-1] is None
    assert runs[("reflora", 0.03)]["iters_to_1e-3"] <= 15
    # step 0.01: RefLoRA in about 38 iterations, LoRA still near 3e2 after 100
    assert runs[("reflora", 0.01)]["iters_to_1e-3"] <= 45
    assert runs[("lora", 0.01)]["loss"][-1] > 100
    # RefLoRA is the fastest of all at both step sizes
    for lr in (0.01, 0.03):
        fastest = runs[("reflora", lr)]["iters_to_1e-3"]
        for method in ("lora", "scaledgd", "reflora_s"):
            other = runs[(method, lr)]["iters_to_1e-3"]
            assert other is None or other > fastest
    assert iters_to([5.0, 1e-2, 1e-3, 0.0]) == 2 and iters_to([math.inf]) is None

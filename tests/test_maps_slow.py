"""Slow (minutes): on the embedded data with the trained demo classifier, the maps point at the object.

Run with ``pytest -m slow``. Trains (or reuses from $JUAP_CACHE) the demo classifier and an RTS model.
"""

import pytest
import torch

import juap
from juap.commands.demo_models import cached_demo_classifier, cached_demo_rts
from juap.commands.train_classifier import TrainClassifierConfig
from juap.interpreters.sanity import (
    held_out_images_with_boxes,
    pointing_rates,
    randomized_copy,
    rank_correlation,
)


@pytest.mark.slow
def test_cam_gradcam_rts_point_at_the_object_and_depend_on_training(tmp_path):
    import os
    from pathlib import Path

    cache = Path(os.environ["JUAP_CACHE"])
    cfg = TrainClassifierConfig()
    clf, splits, metrics, _ = cached_demo_classifier(cfg, cache_dir=cache, progress=False)
    assert metrics["test_accuracy"] >= 0.9
    rts_path, _, _ = cached_demo_rts(cfg, epochs=2, seed=0, cache=cache, progress=False)
    x, _, boxes = held_out_images_with_boxes(splits, 300)
    interps = {
        "cam": juap.create_interpreter("cam", clf),
        "gradcam": juap.create_interpreter("gradcam", clf),
        "rts": juap.create_interpreter("rts", clf, checkpoint=str(rts_path)),
    }
    rates = pointing_rates(interps, x, boxes)
    for name, rate in rates.items():
        assert rate >= 0.8, f"{name}: only {rate:.1%} of the maps point at the object"
    rand = randomized_copy(clf)
    for name in ("cam", "gradcam"):
        with torch.no_grad():
            corr = rank_correlation(interps[name](x), juap.create_interpreter(name, rand)(x)).mean()
        assert corr < 0.5, f"{name} maps barely change when the model is randomised (rank corr {corr:.2f})"

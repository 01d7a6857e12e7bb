"""The named recipes (lib.recipe.RECIPES): each script trains with its own by default. The recipe's
parts have their own files: test_schedules.py, test_ema.py, test_flops.py."""
import dataclasses

import pytest
import torch

from lib.recipe import RECIPES, config_from_args


@pytest.mark.parametrize("script, recipe", [("train.py", "train"), ("transfer.py", "transfer"),
                                            ("crossval.py", "transfer")])
def test_each_script_trains_with_its_named_recipe_by_default(script, recipe):
    """The scripts' defaults are lib.recipe.RECIPES' records, every field (--amp auto resolved)."""
    import importlib
    required = {"train.py": [], "transfer.py": ["--source", "s.pt"], "crossval.py": ["--source", "s.pt"]}[script]
    args = importlib.import_module(script[:-3]).get_args_parser().parse_args(["--data", "demo", "--out", "o",
                                                                              *required])
    config = config_from_args(args, torch.device("cpu"))
    assert config == dataclasses.replace(RECIPES[recipe], amp=config.amp)
    assert RECIPES["train"] != RECIPES["transfer"]

"""The perturbation engine's own edge cases (SHAP and LIME run on it; their tests check it end to end)."""
import torch
from conftest import own_model

from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.lengths import LengthGroups
from fastattr.interpret.perturbation.engine import CHECK_DRAWS, PerturbationRunner, gated_rows, present_positions
from fastattr.interpret.perturbation.inputs import perturbation_baselines


def test_a_length_group_without_a_checked_row_runs_none_in_the_check(monkeypatch):
    """The once-per-layout check runs only the rows of the first draws; a length group may hold none of
    them (seen on PyHealth's Transformer, LIME with 200 perturbations), and must give zeros, not fail."""
    model, batch = own_model("transformer", num_classes=2, seed=1)
    features = FeatureBatch.from_batch(model, batch)
    runner = PerturbationRunner(model, fastattr_lengths(model), use_embeddings=True)
    g = torch.Generator().manual_seed(0)
    draws = {k: torch.randint(0, 2, (12, n), generator=g).float()
             for k, n in (("codes", batch["codes"].shape[1]), ("labs", batch["labs"].shape[1]))}
    rows = gated_rows(draws, present_positions(features), features.size)
    checked = set(rows.inverse[:CHECK_DRAWS].flatten().tolist())
    unchecked = torch.tensor([r for r in range(len(rows.samples)) if r not in checked])
    assert len(unchecked) > 0
    seen = {}

    def capture(self, table, key, task, **kwargs):
        group = (unchecked, None)
        seen["check"] = task.check_run(group, table.subset(unchecked))
        seen["run"] = task.run(group, table.subset(unchecked))
        return task.run(None, table), None

    monkeypatch.setattr(type(runner.lengths), "execute", capture)
    targets = torch.zeros(features.size, dtype=torch.long)
    runner.row_logits(features, perturbation_baselines(None, features, torch.device("cpu")), rows, targets,
                      pack=False)
    assert torch.equal(seen["check"], torch.zeros(len(unchecked)))
    assert seen["run"].shape == (len(unchecked),) and bool(seen["run"].ne(0).any())


def fastattr_lengths(model):
    return LengthGroups(model, "perturbation", "logits")

"""attribute_dataset over a real PyHealth model and dataloader."""
import pytest
import torch

import fastattr

pytestmark = pytest.mark.parity


def test_pyhealth_dataloader_ids_targets_and_values(tmp_path):
    import pyhealth_cases
    from pyhealth.datasets import get_dataloader

    model, first = pyhealth_cases.build("seq", "Transformer", num_classes=3, n=11, batch=4, seed=7,
                                        embedding_dim=16, heads=2)
    loader = get_dataloader(model.dataset, batch_size=4, shuffle=False)
    ig = fastattr.IntegratedGradients(model, steps=4)
    fastattr.attribute_dataset(ig, loader, tmp_path, target_class_idx=2)
    store = fastattr.load_attributions(tmp_path)
    assert len(store) == 11 and store.patient_ids[:4] == [str(p) for p in first["patient_id"]]
    (one,) = store.lookup(first["patient_id"][1], first["visit_id"][1])
    direct = ig.attribute(target_class_idx=2, **first)
    torch.testing.assert_close(one["attr/conditions"], direct["conditions"][1])
    assert one["target"].item() == 2 and one["probability"].shape == (3,)

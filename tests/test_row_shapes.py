"""A run folder's rows have one shape per sample, whatever the batching: the shape the loader's
collate gives the sample alone (PyHealth's batch of one), with the same values."""
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

import fastattr
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

CODES_PER_VISIT = 4  # a nested processor pads every visit to the widest visit it was fitted on


class Patients(torch.utils.data.Dataset):
    """Samples as PyHealth's processors give them: a flat code sequence of its own length, nested
    visits of their own number (each padded to CODES_PER_VISIT, some visits shorter), a continuous
    ``[T, F]`` series of its own T."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            length, visits, steps = (int(torch.randint(lo, hi, (1,), generator=g))
                                     for lo, hi in ((1, 19), (1, 6), (1, 5)))
            nested = torch.zeros(visits, CODES_PER_VISIT, dtype=torch.long)
            for v in range(visits):
                used = int(torch.randint(1, CODES_PER_VISIT, (1,), generator=g))  # never the full width
                nested[v, :used] = torch.randint(2, 30, (used,), generator=g)
            self.samples.append({"patient_id": f"p{i}", "codes": torch.randint(2, 30, (length,), generator=g),
                                 "visits": nested, "labs": torch.randn(steps, 3, generator=g) + 3.0,
                                 "label": torch.tensor(i % 3)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def collate(samples: list[dict]) -> dict:
    """PyHealth's collate: tensors right-padded with zeros to the batch's longest."""
    batch = {"patient_id": [s["patient_id"] for s in samples], "label": torch.stack([s["label"] for s in samples])}
    for key in ("codes", "visits", "labs"):
        batch[key] = pad_sequence([s[key] for s in samples], batch_first=True)
    return batch


def model() -> TransformerClassifier:
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=30), "visits": FeatureProcessor(token=True, size=30),
                        "labs": FeatureProcessor(token=False, size=3)})
    torch.manual_seed(0)
    return TransformerClassifier(spec, num_classes=3, dim=16).eval()


def interpreter(method: str, m: TransformerClassifier):
    return fastattr.IntegratedGradients(m, steps=5) if method == "ig" else fastattr.CheferRelevance(m)


def loader(data: Patients, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_rows_are_the_batch_of_one_whatever_the_batching(tmp_path, method):
    data, m = Patients(29, seed=3), model()
    runs = {"sorted": (loader(data, 6), {}), "rebatched from batch 1": (loader(data, 1), {"batch_tokens": 40}),
            "in order": (loader(data, 6), {"sort_by_length": False})}
    stores = {}
    for name, (source, kwargs) in runs.items():
        attribute_dataset(interpreter(method, m), source, tmp_path / name.replace(" ", "-"), progress=False, **kwargs)
        stores[name] = load_attributions(tmp_path / name.replace(" ", "-"))
    assert stores["sorted"].info["batching"]["sorted"] and not stores["in order"].info["batching"]["sorted"]
    alone = interpreter(method, m)
    widths = set()
    for i in range(len(data)):
        expected = alone.attribute(**collate([data[i]]))
        for name, store in stores.items():
            row = store[i]
            for key, value in expected.items():
                got = row[f"attr/{key}"]
                assert got.shape == value.shape[1:], (name, i, key)
                torch.testing.assert_close(got, value[0], rtol=1e-5, atol=1e-6)
                assert row[f"keep/{key}"].shape == got.shape
            first = stores["sorted"][i]  # runs batched differently: the same shapes, values to float rounding
            assert first.keys() == row.keys() and all(first[k].shape == row[k].shape for k in row)
            for k in row:
                torch.testing.assert_close(row[k], first[k], rtol=0, atol=1e-6)
            assert row["input/codes"].shape == data[i]["codes"].shape
            assert row["input/visits"].shape == data[i]["visits"].shape  # own visits, the processor's width
            assert torch.equal(row["input/visits"], data[i]["visits"])
        widths.add(stores["sorted"][i]["attr/codes"].shape[0])
    assert len(widths) > 5
    everything = stores["sorted"].all()  # store.all() pads to the widest, as a dataloader pads a batch
    widest = max(len(s["codes"]) for s in data.samples)
    assert everything["attr/codes"].shape[:2] == (29, widest)
    assert not any(k.startswith("shape/") for k in everything)
    for i in (0, 13):
        n = len(data[i]["codes"])
        assert torch.equal(everything["attr/codes"][i, :n], stores["sorted"][i]["attr/codes"])
        assert not everything["attr/codes"][i, n:].any()


def test_batches_seen_only_collated_are_cut_by_their_masks(tmp_path):
    # A list of batches gives no samples to measure: rows are cut one past the last non-padding
    # position (here a visit is as wide as its widest used code, not the processor's width).
    data, m = Patients(9, seed=5), model()
    batches = [collate([data[i] for i in range(s, min(s + 4, 9))]) for s in range(0, 9, 4)]
    attribute_dataset(fastattr.IntegratedGradients(m, steps=3), batches, tmp_path, progress=False,
                      sort_by_length=False)
    store = load_attributions(tmp_path)
    for i in range(9):
        visits = data[i]["visits"]
        used = int((visits != 0).any(dim=0).nonzero().max()) + 1
        assert store[i]["input/visits"].shape == (visits.shape[0], used)
        assert store[i]["attr/codes"].shape == data[i]["codes"].shape
        assert store[i]["attr/labs"].shape == data[i]["labs"].shape


def test_a_run_without_row_shapes_reads_rows_as_stored(tmp_path):
    # Runs written before rows had their own shapes carry no shape/ tensors: rows keep the width
    # of the batch they were written in.
    from safetensors.torch import load_file, save_file

    from fastattr.runs.files import SHAPE_PREFIX

    data, m = Patients(7, seed=6), model()
    attribute_dataset(fastattr.CheferRelevance(m), loader(data, 7), tmp_path, progress=False, sort_by_length=False)
    (shard,) = tmp_path.glob("shard-*.safetensors")
    tensors = load_file(shard)
    assert any(k.startswith(SHAPE_PREFIX) for k in tensors)
    save_file({k: v for k, v in tensors.items() if not k.startswith(SHAPE_PREFIX)}, shard)
    import hashlib
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][shard.name]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = load_attributions(tmp_path)
    widest = max(len(s["codes"]) for s in data.samples)
    assert all(store[i]["input/codes"].shape == (widest,) for i in range(7))

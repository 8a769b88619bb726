"""Decoded long tables, parquet/CSV export, one-pass summaries and the HTML report of a run,
each checked against an independent computation from the inputs and the stored tensors."""
import base64
import json
import math
from html.parser import HTMLParser

import pytest
import torch

import fastattr
from fastattr import cli
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.report.page import average_ranks, spearman, write_report
from fastattr.runs import tables

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

CODE_NAMES = [None, "<unk>"] + [f"C{i}" for i in range(2, 40)]  # id 0 has no name: shown as "0"
VISIT_VOCAB = {"<pad>": 0, "<unk>": 1, **{f"V{i}": i for i in range(2, 25)}}  # PyHealth's code_vocab form


def three_feature_run(tmp_path, num_classes=3, vocab=True, name="run"):
    """A run over flat codes [B, N], nested visits [B, V, C] (PyHealth-style {code: id} vocab) and
    continuous labs [B, T, 4] (no vocab: channels), batches of different padded widths. Returns the
    folder and the raw batches (the independent source of padding)."""
    g = torch.Generator().manual_seed(11)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40),
                        "visits": FeatureProcessor(token=True, size=25),
                        "labs": FeatureProcessor(token=False, size=4)}, {"label": "multiclass"})
    torch.manual_seed(1)
    model = TransformerClassifier(spec, num_classes=num_classes, dim=16, heads=2, layers=1).eval()
    batches = []
    for b, (size, n, v, c, t) in enumerate([(3, 7, 3, 4, 5), (4, 5, 2, 3, 2), (2, 9, 4, 2, 6)]):
        codes = torch.randint(2, 40, (size, n), generator=g)
        codes[:, 0] = 2 + b  # a shared code: ties and repeats across samples
        codes *= torch.arange(n) < torch.randint(1, n + 1, (size, 1), generator=g)
        visits = torch.randint(2, 25, (size, v, c), generator=g)
        visits *= torch.arange(c) < torch.randint(1, c + 1, (size, v, 1), generator=g)
        visits *= (torch.arange(v) < torch.randint(1, v + 1, (size, 1), generator=g))[..., None]
        labs = torch.randn(size, t, 4, generator=g)
        labs *= (torch.arange(t) < torch.randint(1, t + 1, (size, 1), generator=g))[..., None]
        batches.append({"codes": codes, "visits": visits, "labs": labs,
                        "patient_id": [f"p{b}-{i}" for i in range(size)], "visit_id": [f"v{i}" for i in range(size)]})
    out = tmp_path / name
    vocab = {"codes": CODE_NAMES, "visits": VISIT_VOCAB} if vocab else None
    attribute_dataset(fastattr.IntegratedGradients(model, steps=3), batches, out, vocab=vocab,
                      annotations={"codes": {"C5": "planted"}} if vocab else None, progress=False)
    return out, batches


def expected_rows(batches, store):
    """The long table built by hand: loops over every entry of the raw inputs, padding decided from
    the inputs themselves (token id 0; a lab row of zeros)."""
    rows, sample = [], 0
    for batch in batches:
        for i in range(len(batch["patient_id"])):
            stored = store[sample]
            prob, target = stored["probability"], int(stored["target"])
            common = dict(sample=sample, patient_id=batch["patient_id"][i], visit_id=batch["visit_id"][i],
                          probability=float(prob[target]), target=target)
            attr = stored["attr/codes"]
            for n, code in enumerate(batch["codes"][i].tolist()):
                if code:
                    name = CODE_NAMES[code] if CODE_NAMES[code] is not None else str(code)
                    rows.append({**common, "feature": "codes", "visit": -1, "position": n, "code_id": code,
                                 "code": name, "attribution": float(attr[n])})
            attr = stored["attr/visits"]
            names = {i: k for k, i in VISIT_VOCAB.items()}
            for v, visit in enumerate(batch["visits"][i].tolist()):
                for c, code in enumerate(visit):
                    if code:
                        rows.append({**common, "feature": "visits", "visit": v, "position": c, "code_id": code,
                                     "code": names[code], "attribution": float(attr[v, c])})
            attr = stored["attr/labs"]
            for t, values in enumerate(batch["labs"][i].tolist()):
                if any(values):
                    for ch in range(4):
                        rows.append({**common, "feature": "labs", "visit": -1, "position": t, "code_id": ch,
                                     "code": f"labs[{ch}]", "attribution": float(attr[t, ch])})
            sample += 1
    return pd.DataFrame(rows)


COLUMNS = ["sample", "patient_id", "visit_id", "feature", "visit", "position", "code_id", "code", "attribution",
           "probability", "target"]


def comparable(frame):
    frame = frame[COLUMNS].copy()
    for column in ("patient_id", "visit_id", "feature", "code"):
        frame[column] = frame[column].astype(str)
    for column in ("visit", "position", "code_id", "target", "sample"):
        frame[column] = frame[column].astype("int64")
    return frame.sort_values(["sample", "feature", "visit", "position", "code_id"], ignore_index=True)


def test_dataframe_is_every_non_padding_entry_decoded(tmp_path):
    out, batches = three_feature_run(tmp_path)
    store = load_attributions(out)
    frame = store.to_dataframe()
    assert list(frame.columns) == COLUMNS
    assert str(frame["attribution"].dtype) == "float32" and str(frame["sample"].dtype) == "int64"
    assert frame["sample"].is_monotonic_increasing
    expected = expected_rows(batches, store)
    pd.testing.assert_frame_equal(comparable(frame), comparable(expected), check_dtype=False, atol=1e-6, rtol=1e-6)
    # the IG attributions of the kept rows account for all the stored attribution (padding is exactly 0)
    total = sum(float(t.double().sum()) for k, t in store.all().items() if k.startswith("attr/"))
    assert frame["attribution"].astype("float64").sum() == pytest.approx(total, rel=1e-6)
    assert set(frame["code"][frame.feature == "codes"]) <= {n for n in CODE_NAMES if n} | {"0"}
    assert store.info["features"]["visits"]["vocab"][3] == "V3" and store.info["method"] == "IntegratedGradients"


def test_summary_equals_a_pandas_groupby_of_the_long_table(tmp_path):
    out, _ = three_feature_run(tmp_path)
    long = comparable(load_attributions(out).to_dataframe())
    per = long.groupby(["sample", "feature", "code_id"], as_index=False).agg(
        attr=("attribution", "sum"), occ=("attribution", "size"), cls=("target", "first"))
    top = per.loc[per.groupby("sample")["attr"].idxmax(), ["sample", "feature", "code_id"]]
    per["is_top"] = per.set_index(["sample", "feature", "code_id"]).index.isin(
        top.set_index(["sample", "feature", "code_id"]).index)
    classes = long.groupby("sample")["target"].first()
    for by_class in (False, True):
        got = tables.summarize(out, by_class=by_class)
        keys = ["feature", "code_id"] + (["class"] if by_class else [])
        per["class"] = per["cls"]
        want = per.groupby(keys).agg(samples=("attr", "size"), occurrences=("occ", "sum"),
                                     mean_attribution=("attr", "mean"),
                                     mean_abs_attribution=("attr", lambda s: s.abs().mean()),
                                     sum_abs=("attr", lambda s: s.abs().sum()),
                                     top_count=("is_top", "sum")).reset_index()
        totals = want["class"].map(classes.value_counts()) if by_class else len(classes)
        want["frequency"] = want["samples"] / totals
        want["importance"] = want["sum_abs"] / totals
        want["top_share"] = want["top_count"] / totals
        merged = got.merge(want, on=keys, suffixes=("", "_want"), validate="one_to_one")
        assert len(merged) == len(got) == len(want)
        for column in ("samples", "occurrences", "top_count"):
            assert (merged[column] == merged[f"{column}_want"]).all(), column
        for column in ("frequency", "mean_attribution", "mean_abs_attribution", "importance", "top_share"):
            assert merged[column].to_numpy() == pytest.approx(merged[f"{column}_want"].to_numpy(), rel=1e-5, abs=1e-7)
        assert got["importance"].is_monotonic_decreasing if not by_class else True
        assert got.attrs["class_rule"] == "explained class (target)" and got.attrs["samples"] == len(classes)
    annotated = tables.summarize(out)
    assert set(annotated.loc[annotated.annotation == "planted", "code"]) == {"C5"}


def test_binary_model_splits_by_predicted_label(tmp_path):
    cohort = SyntheticCohort(patients=30, seed=4)
    torch.manual_seed(0)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=16, heads=2, layers=1).eval()
    with torch.no_grad():  # centre the logit on this cohort: both predicted labels occur
        model.head.bias -= model(**cohort.batch(range(30)))["logit"].median()
    loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=8, collate_fn=CohortDataset.collate)
    attribute_dataset(fastattr.CheferRelevance(model), loader, tmp_path, vocab={"codes": cohort.names},
                      annotations=cohort.annotations(), progress=False)
    frame = load_attributions(tmp_path).to_dataframe()
    predicted = frame.groupby("sample")["probability"].first() >= 0.5
    assert 5 <= predicted.sum() <= 25 and (frame["target"] == 0).all()
    summary = tables.summarize(tmp_path, by_class=True)
    assert summary.attrs["class_rule"].startswith("predicted label")
    totals = (summary["samples"] / summary["frequency"]).round().groupby(summary["class"]).unique()
    assert {c: list(t) for c, t in totals.items()} == \
        {c: [float(n)] for c, n in predicted.astype(int).value_counts().items()}
    marks = tables.summarize(tmp_path).set_index("code")["annotation"]
    for name, mark in cohort.annotations()["codes"].items():
        if name in marks.index:
            assert marks[name] == mark


def test_export_streams_parquet_row_groups_and_csv(tmp_path):
    import pyarrow.parquet as pq

    out, _ = three_feature_run(tmp_path)
    frame = load_attributions(out).to_dataframe()
    path = tables.export(out, tmp_path / "t.parquet", row_group_rows=50)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == len(frame) and meta.num_row_groups == math.ceil(len(frame) / 50)
    assert all(meta.row_group(i).num_rows == 50 for i in range(meta.num_row_groups - 1))
    back = pd.read_parquet(path)
    assert str(back["attribution"].dtype) == "float32" and str(back["visit"].dtype) == "int32"
    pd.testing.assert_frame_equal(comparable(back), comparable(frame))
    csv = pd.read_csv(tables.export(out, tmp_path / "t.csv"))
    pd.testing.assert_frame_equal(comparable(csv), comparable(frame), check_dtype=False, atol=1e-6, rtol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_summarize_export_report(tmp_path, capsys):
    out, _ = three_feature_run(tmp_path)
    assert cli.main(["summarize", str(out), "--top", "3", "--by-class", "--output", str(tmp_path / "s.csv")]) == 0
    printed = capsys.readouterr().out
    assert "class = explained class (target)" in printed and "mean_abs_attribution" in printed
    assert len(pd.read_csv(tmp_path / "s.csv")) == len(tables.summarize(out, by_class=True))
    assert cli.main(["export", str(out), "--format", "csv"]) == 0 and (out / "attributions.csv").exists()
    assert cli.main(["export", str(out)]) == 0 and (out / "attributions.parquet").exists()
    assert cli.main(["report", str(out), "--top", "5", "--patients", "2"]) == 0 and (out / "report.html").exists()


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append((tag, attrs[key]))

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page, " ".join("".join(page.text).split())


def embedded_pngs(page):
    pngs = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        pngs.append(data)
    return pngs


def test_report_of_two_runs_embeds_every_figure_and_marks_the_truth(tmp_path):
    cohort = SyntheticCohort(patients=48, seed=5)
    torch.manual_seed(0)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    model = TransformerClassifier(spec, num_classes=2, dim=16, heads=2, layers=1).eval()
    loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=16, collate_fn=CohortDataset.collate)
    interpreters = (("ig", fastattr.IntegratedGradients(model, steps=3)), ("chefer", fastattr.CheferRelevance(model)))
    for name, interp in interpreters:
        attribute_dataset(interp, loader, tmp_path / name, vocab={"codes": cohort.names},
                          annotations=cohort.annotations(), progress=False)
    path = write_report([tmp_path / "ig", tmp_path / "chefer"], tmp_path / "r.html", top=10, patients=3)
    page, text = parse(path)
    # agreement scatter + per run: top codes, distribution, per class, heat maps
    assert len(embedded_pngs(page)) == 1 + 2 * 4
    assert page.external == [] and "script" not in page.tags and "link" not in page.tags
    assert "Spearman rank correlation" in text and "top-10 overlap" in text
    assert "samples whose top code is the same" in text
    for mark in ("planted", "planted pair", "distractor"):
        assert mark in text
    ig = tables.summarize(tmp_path / "ig")
    assert ig["code"].iloc[0] in text  # the top code is named in the page


def test_report_notes_a_feature_without_vocabulary_and_shows_ids(tmp_path):
    out, _ = three_feature_run(tmp_path, vocab=False)
    summary = tables.summarize(out)
    codes = summary[summary.feature == "codes"]
    assert (codes["code"] == codes["code_id"].astype(str)).all()
    page, text = parse(write_report(out, top=5, patients=2))
    assert len(embedded_pngs(page)) == 4
    assert "Feature codes has no vocabulary in this run: its codes are shown as ids" in text
    assert "Feature labs has no vocabulary in this run: its codes are shown as channel numbers" in text


def test_spearman_and_ranks():
    import numpy as np

    assert list(average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_attributions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a fastattr attribution run: it holds no manifest.json"):
        tables.summarize(tmp_path / "empty")
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "not a fastattr attribution run" in capsys.readouterr().err
    out, _ = three_feature_run(tmp_path)
    with pytest.raises(ValueError, match=r"features \['nope'\] are not in the run"):
        tables.summarize(out, features=["nope"])
    with pytest.raises(ValueError, match="format must be one of"):
        tables.export(out, tmp_path / "t.xlsx")
    with pytest.raises(ValueError, match="runs must be different run folders"):
        write_report([out, out, out])
    # a damaged shard is named by every reader
    shard = sorted(out.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    for call in (lambda: tables.summarize(out), lambda: tables.export(out, tmp_path / "x.parquet"),
                 lambda: write_report(out), lambda: load_attributions(out).to_dataframe()):
        with pytest.raises(ValueError, match=f"shard {shard}.*SHA-256 does not match"):
            call()
    assert not (tmp_path / "x.parquet").exists()
    # a run written before runs described themselves
    old, _ = three_feature_run(tmp_path, name="old")
    (old / "run.json").unlink()
    with pytest.raises(ValueError, match="has no run.json"):
        tables.to_dataframe(old)


def test_resume_refuses_another_vocabulary(tmp_path):
    out, batches = three_feature_run(tmp_path)
    info = json.loads((out / "run.json").read_text())
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40), "visits": FeatureProcessor(token=True, size=25),
                        "labs": FeatureProcessor(token=False, size=4)}, {"label": "multiclass"})
    model = TransformerClassifier(spec, num_classes=3, dim=16, heads=2, layers=1).eval()
    with pytest.raises(ValueError, match="features or vocabulary differs"):
        attribute_dataset(fastattr.IntegratedGradients(model, steps=3), batches, out,
                          vocab={"codes": [f"X{i}" for i in range(40)]}, progress=False)
    assert json.loads((out / "run.json").read_text()) == info
    with pytest.raises(ValueError, match="vocab names features the model does not have"):
        attribute_dataset(fastattr.IntegratedGradients(model, steps=3), batches, tmp_path / "x",
                          vocab={"dx": ["a"]}, progress=False)

"""Mutation check: applies hand-written protocol bugs one at a time to a scratch worktree of HEAD
and runs the default tier (``-m "not slow"``) against each; every mutation must make it fail.

    python tests/mutation_check.py          # every mutation, each one run of the default tier
    python tests/mutation_check.py padding  # only those whose name holds one of the words given
    MUTATION_TESTS="tests/test_lime.py tests/test_shap.py" python tests/mutation_check.py LIME  # a quick look

Each bug is what a plausible edit could do: the token mask becomes all ones, the continuous mask
is dropped, the embedding dim is not summed, the UNK baseline becomes padding, the target argmax
is taken from a path point instead of the input, Chefer's R (or its row vector) starts at zeros,
Chefer's results take IG's shape rule, its length groups are put back or fed wrongly, stale
attention gradients go unnoticed, the padding check's verdict is ignored, cached from one batch for
later ones, skipped for Chefer once a batch passed, or forgotten for a model that failed it, the
evaluator skips its batch's padding check; the evaluator shares one
padding verdict across kinds of ablated rows, drops the NEGATIVE sign, the keep-one-code rule or the
tie rule; a run's rows lose their own shape (from the masks instead of the batch of one, or not read
back); steps="auto" leaves the completeness gap out of its estimate or loosens the tolerance.
"""
import os
import pathlib
import re
import subprocess
import sys
import tempfile

repo = pathlib.Path(__file__).resolve().parent.parent
scratch = tempfile.mkdtemp(prefix="fastattr-mutants-")
root = pathlib.Path(scratch) / "tree"
subprocess.run(["git", "worktree", "add", "-q", "--detach", str(root), "HEAD"], cwd=repo, check=True)
M = [
 ("token mask all-ones", "fastattr/interpret/features.py",
  "        if self.token or value.dim() < 3:\n            return (value != 0).int()",
  "        if self.token:\n"
  "            return torch.ones_like(value).int()\n"
  "        if value.dim() < 3:\n"
  "            return (value != 0).int()"),
 ("continuous mask dropped", "fastattr/interpret/features.py",
  '        if "mask" in self.schema or len(parts) == len(self.schema) + 1:',
  '        if "mask" in self.schema or len(parts) == len(self.schema) + 1 or not self.token:'),
 ("no sum over the embedding dim", "fastattr/interpret/gradient/ig.py",
  "        return {k for k in self._embedded(part, embed) if part.value(k).dim() >= 2}",
  "        return set()"),
 ("UNK baseline replaced by padding", "fastattr/interpret/gradient/ig.py",
  "torch.ones_like(v) if k in tokens else", "torch.zeros_like(v) if k in tokens else"),
 ("target argmax taken from the path (baseline point) instead of the input", "fastattr/interpret/gradient/ig.py",
  "            features, lambda out: resolve_targets(target_class_idx, out, features.size, out.shape[1], device))",
  "            features, lambda out: resolve_targets(target_class_idx, model.forward(**features.call(baselines))"
  "['logit'].detach().reshape(features.size, -1), features.size, out.shape[1], device))"),
 ("Chefer R started at zeros", "fastattr/core/relevance.py",
  "            R = torch.eye(tokens, dtype=dtype, device=device).expand(batch, tokens, tokens).contiguous()",
  "            R = torch.zeros(batch, tokens, tokens, dtype=dtype, device=device)"),
 ("Chefer row vector started at zeros", "fastattr/core/relevance.py",
  "        v = torch.nn.functional.one_hot(rows.to(device).long(), tokens).to(dtype)",
  "        v = torch.zeros(batch, tokens, dtype=dtype, device=device)"),
 ("Chefer results expanded by IG's rule (a tensor feature repeated to [B, F])",
  "fastattr/interpret/attention/chefer.py",
  "        return features.expand(done.relevance, nested_only=True)",
  "        return features.expand(done.relevance)"),
 ("Chefer group results put back without growing the token dim", "fastattr/interpret/features.py",
  "                    grown[0] += self.value(key).shape[1] - part.value(key).shape[1]",
  "                    pass"),
 ("Chefer groups get the whole batch's other entries (labels)", "fastattr/interpret/attention/chefer.py",
  "                rows = {**select_samples(rest, group[0], features.size), **part.inputs()}",
  "                rows = {**rest, **part.inputs()}"),
 ("Chefer groups get the features with the masks fastattr appended", "fastattr/interpret/features.py",
  "            parts = feature[:-1] if key in self.appended else feature",
  "            parts = feature"),
 ("stale attention gradients not looked for", "fastattr/interpret/attention/capture.py",
  "isinstance(pair[1], torch.Tensor) and old.stale(pair[1])",
  "isinstance(pair[1], torch.Tensor) and False"),
 ("the padding check's verdict ignored", "fastattr/interpret/lengths.py",
  "        return ok\n",
  "        return True\n"),
 ("the padding check's verdict cached from one batch (a passed probe taken for every later batch)",
  "fastattr/interpret/lengths.py",
  "        return probe is None or self.passes(features, probe(groups), pack, groups)\n",
  "        if probe is None or ('passed',) + layout_key(features) in self.verdicts:\n"
  "            return True\n"
  "        ok = self.passes(features, probe(groups), pack, groups)\n"
  "        self.verdicts[('passed',) + layout_key(features)] = (ok, 0.0)\n"
  "        return ok\n"),
 ("Chefer's per-batch padding check skipped once a batch passed", "fastattr/interpret/lengths.py",
  "        if packed is not None and task.check is not None and not self.passes(",
  "        if packed is not None and task.check is not None and ('checked',) not in self.verdicts and not "
  "self.verdicts.update({('checked',): (True, 0.0)}) and not self.passes("),
 ("a model that depends on padding is forgotten after its batch", "fastattr/interpret/padding.py",
  "        _DEPENDENT.setdefault(model, {})[layout] = report\n",
  "        pass\n"),
 ("the evaluator's padding check of the batch skipped", "fastattr/metrics/removal.py",
  "        return trimming_allowed(self.lengths, features, self.pack_lengths,",
  "        return True or trimming_allowed(self.lengths, features, self.pack_lengths,"),
 ("the engine's padding check of a batch always passes", "fastattr/interpret/perturbation/rows.py",
  "    return lengths.allows(features, pack, None, probe)",
  "    return True"),
 ("evaluator: one padding verdict for every kind of ablated row", "fastattr/metrics/removal.py",
  '            key = layout_key(features, "ablated", tuple(kind.tolist()))',
  '            key = layout_key(features, "ablated")'),
 ("evaluator: rows left with nothing of a feature share a kind with rows that lost their first position",
  "fastattr/metrics/removal.py",
  "        kinds, which = torch.unique(_row_kinds(features), dim=0, return_inverse=True)",
  "        kinds, which = torch.unique(features.leading_present(), dim=0, return_inverse=True)"),
 ("Chefer plans its groups on every padded position (not its tokens)",
  "fastattr/core/packing.py",
  'TOKEN_WORK = {"chefer"}', "TOKEN_WORK = set()"),
 ("Chefer's plan leaves out its padding check's cost", "fastattr/core/packing.py",
  '"integrated_gradients": 2 / 3, "adaptive_integrated_gradients": 2 / 3, "chefer": 1 / 3,',
  '"integrated_gradients": 2 / 3, "adaptive_integrated_gradients": 2 / 3, "chefer": 0.0,'),
 ("Chefer's trimmed groups keep their own argmax in a near-tie", "fastattr/interpret/attention/chefer.py",
  "    if not bool(near.any()):\n        return None\n",
  "    if True:\n        return None\n"),
 ("evaluator: NEGATIVE samples scored without negated probabilities", "fastattr/metrics/removal.py",
  "        sign = torch.where(negative[keep], -1.0, 1.0).to(start.dtype)",
  "        sign = torch.ones_like(start)"),
 ("evaluator: a sample whose codes are all removed keeps none", "fastattr/metrics/ablation.py",
  "    if bool(emptied.any()):",
  "    if False:"),
 ("evaluator: masks without PyHealth's tie rule", "fastattr/metrics/masks.py",
  "    if bool(tied.any()):",
  "    if False:"),
 ("run rows: each sample's own shape taken from the masks, not from its batch of one", "fastattr/runs/row_shapes.py",
  "    if alone is None:\n",
  "    if True:\n"),
 ("the engine's padded rows run in chunks of another row count than the batch's",
  "fastattr/interpret/perturbation/rows.py",
  "    if padded and batch_rows is not None:\n        return batch_rows, True",
  "    if False:\n        return batch_rows, True"),
 ("cohort sorts a method whose values depend on padding", "fastattr/cohort/batching.py",
  "        if auto:\n            return LoaderOrderBatches(",
  "        if False:\n            return LoaderOrderBatches("),
 ("cohort padding probe trusts the model's check alone", "fastattr/cohort/padding_probe.py",
  "    if explain is not None and method_ignores_padding(explain, collate, samples, batch):", "    if False:"),
 ("cohort probe's samples read again when sorted", "fastattr/cohort/batching.py",
  "collate_fn=collate, first=first)", "collate_fn=collate)"),
 ("SHAP merges rows that differ only at padding without checking the model",
  "fastattr/interpret/perturbation/engine.py",
  "        self.merged_padding = not padded or not self.padding_gates_matter(",
  "        self.merged_padding = True or not self.padding_gates_matter("),
 ("SHAP's coalitions drawn in one call", "fastattr/interpret/perturbation/shap.py",
  "        rows += [torch.randint(2, (total,), device=device, generator=generator).float()\n"
  "                 for _ in range(max(0, count - 2))]",
  "        rows += list(torch.randint(2, (max(0, count - 2), total), device=device, generator=generator).float()"
  "[torch.randperm(max(0, count - 2))])"),
 ("IG's whole-point chunks interpolated from x, not the baseline", "fastattr/kernels/interpolate.py",
  "        out += baseline.unsqueeze(0)", "        out += x.unsqueeze(0)"),
 ("IG's gradients reduced without the rule's weights", "fastattr/kernels/interpolate.py",
  "    if not (weights.device.type == \"cpu\" and bool(torch.all(weights == 1))):", "    if False:"),
 ("IG's chunk probe counts the model's weights as activations", "fastattr/core/chunks.py",
  "        if not _is_weight(tensor):", "        if True:"),
 ("SHAP's ridge rows scaled by the regularization, not its square root",
  "fastattr/interpret/perturbation/shap.py",
  "    reg = torch.sqrt(torch.tensor(regularization, device=device)) * torch.eye(total, device=device)",
  "    reg = torch.tensor(regularization, device=device) * torch.eye(total, device=device)"),
 ("SHAP's empty and full coalitions weighted 100, not PyHealth's 1,000", "fastattr/interpret/perturbation/shap.py",
  "EDGE_WEIGHT = 1000.0", "EDGE_WEIGHT = 100.0"),
 ("perturbation rows deduplicated across patients (the sample left out of the key)",
  "fastattr/interpret/perturbation/rows.py",
  "    _, inverse = torch.unique(torch.cat([sample, *flat], dim=1), dim=0, return_inverse=True)",
  "    _, inverse = torch.unique(torch.cat([sample * 0, *flat], dim=1), dim=0, return_inverse=True)"),
 ("LIME draws its keys in sorted order, not the batch's", "fastattr/interpret/perturbation/lime.py",
  "        order = [k for k in batch if k in counts]",
  "        order = sorted(counts)"),
 ("LIME's ridge rows scaled by alpha, not its square root", "fastattr/interpret/perturbation/lime.py",
  '        scale = alpha if feature_selection == "lasso" else torch.sqrt(torch.tensor(alpha))',
  "        scale = alpha"),
 ("exact Shapley: a coalition's weight taken at its own size where it holds the player",
  "fastattr/interpret/perturbation/shapley.py",
  "    return torch.where(bits == 1, table[(size - 1).clamp(min=0)], -table[size])",
  "    return torch.where(bits == 1, table[size.clamp(max=players - 1)], -table[size])"),
 ("run rows: the reader ignores the stored row shapes", "fastattr/runs/reader.py",
  "                if SHAPE_PREFIX + name in names:",
  "                if False:"),
 ("steps='auto': a panel's completeness gap left out of its estimate", "fastattr/core/adaptive.py",
  "GAP_WEIGHT = 0.5\n",
  "GAP_WEIGHT = 0.0\n"),
 ("steps='auto': a sample's budget 10x its tolerance", "fastattr/core/adaptive.py",
  "        budget = max(tolerance * norms[s], floors[s])",
  "        budget = max(10 * tolerance * norms[s], floors[s])"),
]
survivors = []
chosen = [m for m in M if not sys.argv[1:] or any(word in m[0] for word in sys.argv[1:])]
for name, path, old, new in chosen:
    f = root / path
    src = f.read_text()
    assert src.count(old) == 1, (name, src.count(old))
    f.write_text(src.replace(old, new))
    targets = os.environ.get("MUTATION_TESTS", "tests").split()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *targets],
                       cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    f.write_text(src)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", r.stdout, re.M)))
    summary = r.stdout.strip().splitlines()[-1]
    print(f"## {name}  ({path})\n{summary}\nfailing: {len(failed)}")
    for t in failed[:12]:
        print("  ", t)
    if len(failed) > 12:
        print(f"   ... and {len(failed) - 12} more")
    sys.stdout.flush()
    if not failed:
        survivors.append(name)
subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=repo, check=True)
print("every mutation was caught" if not survivors else f"SURVIVED: {survivors}")
sys.exit(1 if survivors else 0)

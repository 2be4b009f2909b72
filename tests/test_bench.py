"""The benchmark's contenders and the GPU check's report (its dry run on the CPU)."""

import json

import numpy as np
import pytest
import torch

from bench import authors
from bench.step_bench import compose, pipeline_step_fn, setup
from pipeline.engine.data import synthetic


def test_authors_loop_without_augmentation_computes_the_full_batch_step():
    """The contender is faithful: with augmentation off its loss and gradient norms at theta_0
    are the pipeline's (only the summation order differs), and both move theta the same way."""
    cfg = compose("cnn", 256, 8, ["model.norm=none", "data.image_size=32", "optim.h=1e-3", "data.std=population"],
                  device="cpu", micro_batch=100)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        from pipeline.engine.step import bn_layers, full_batch_step, partition

        params = [p for p in model.parameters()]
        m = full_batch_step(fwd, data.x_train, data.y_train, data.task, partition(256, 100), params, 1e-8,
                            bn_layers(model))
        ours = {k: float(m[k]) for k in ("loss", "pert_norm", "l1_norm", "l2_norm")}
        xtr, ytr, xte, yte, _ = synthetic(cfg.data)
        hwc = [t.permute(0, 2, 3, 1).contiguous().numpy() for t in (xtr, xte)]
        tl, sl = authors.loaders(hwc[0], ytr, hwc[1], yte, augment=False, workers=0, batch_size=100,
                                 pin_memory=False)
        sgd = torch.optim.SGD(params, lr=0.0)  # theta stays: the metrics are those of theta_0
        theirs = authors.authors_step(model, sgd, tl, sl, device)
    for k, v in ours.items():
        assert np.isclose(theirs[k], v, rtol=2e-5), (k, theirs[k], v)
    assert 0 <= theirs["test_acc"] <= 1 and theirs["acc"] == float(m["correct"]) / 256


def test_authors_loop_augmentation_changes_the_gradient():
    cfg = compose("cnn", 128, 8, ["model.norm=none"], device="cpu", micro_batch=128)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        xtr, ytr, xte, yte, _ = synthetic(cfg.data)
        hwc = [t.permute(0, 2, 3, 1).contiguous().numpy() for t in (xtr, xte)]
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        off = [authors.authors_step(model, sgd, *authors.loaders(hwc[0], ytr, hwc[1], yte, a, 0, 64, False),
                                    device)["l2_norm"] for a in (False, False, True)]
    assert np.isclose(off[0], off[1], rtol=1e-5) and not np.isclose(off[0], off[2], rtol=1e-3)


def test_pipeline_step_of_the_bench_is_the_training_loop_step(tmp_path):
    """One step of the bench's contender gives theta_1 of a real training run of the same config
    (its final checkpoint after max_steps=1), to the bit."""
    from omegaconf import open_dict

    from pipeline.runs.ids import run_id
    from pipeline.runs.rundir import RunDir
    from pipeline.train import train

    cfg = compose("cnn", 64, 4, ["precision=bf16", "train.max_steps=1", "train.progress=none"], device="cpu",
                  micro_batch=32)
    with open_dict(cfg):
        cfg.paths.runs = str(tmp_path / "runs")
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, test_pass, params, parts = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
        before = [p.detach().clone() for p in params]
        step()
        test_pass()
        bench_theta1 = {k: v.detach().clone() for k, v in model.named_parameters()}  # theta (not BN's running stats)
    assert len(parts) == 2 and any(not torch.equal(a, b) for a, b in zip(before, params))
    assert train(cfg) == "completed"
    ckpt = torch.load(RunDir(cfg.paths.runs, run_id(cfg)).checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1
    assert bench_theta1 and all(torch.equal(v, ckpt["model"][k]) for k, v in bench_theta1.items())


@pytest.mark.slow
def test_gpucheck_dry_run_writes_its_report(tmp_path):
    """No GPU here: the dry run exercises every section on the CPU and the report's format."""
    from bench.gpucheck import main

    main(["--dry", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpucheck.json").read_text())
    assert set(res) >= {"exactness", "speed", "auto_micro_batch", "contest", "data_parallel", "environment",
                        "fidelity", "packed", "sharpness"}
    assert [r["k"] for r in res["packed"]["rows"]] == [1, 2] and "error" not in res["packed"]
    assert max(res["exactness"]["max_rel_diff"].values()) < 1e-5  # fp32 against fp64
    assert all("ms" in r for r in res["speed"]) and res["auto_micro_batch"][0]["chosen"] % 100 == 0
    c = res["contest"][0]
    assert set(c["ratio"]) == {"bare", "authors aug off", "authors aug on"}
    md = (tmp_path / "gpucheck.md").read_text()
    for head in ("## 1. Exactness", "## 2. Step time", "## 3. train.micro_batch=auto", "## 4. Pipeline against",
                 "## 5. Data-parallel", "## 6. Precision fidelity", "## 7. Packed runs", "## 8. A sharpness record"):
        assert head in md
    assert "error" not in res["sharpness"] and res["sharpness"]["products"] >= 2 and res["sharpness"]["steps"] > 1
    assert "error" not in res["fidelity"] and "| `hill_height` |" in md  # the fidelity table itself
    assert (tmp_path / "fidelity" / "tiny-mlp" / "deviation.png").exists()
    assert md.count("| cnn (N=64) |") == len(res["speed"])


@pytest.mark.slow
def test_the_thread_and_start_up_benchmarks_measure_what_they_say(capsys):
    """The two benchmarks of the thread budget and the start-up run and report each figure (their
    values are measurements, printed by `make bench`, not asserted)."""
    import re

    from bench import startup_bench, threads_bench

    threads_bench.main(["--steps", "3", "--reps", "1", "--no-busy", "--jobs", "2"])
    out = capsys.readouterr().out
    assert re.search(r"the budget \(\d+ threads? per run\): +\d+\.\d\d", out), out
    startup_bench.main(["--reps", "1"])
    out = capsys.readouterr().out
    for point in ("toy", "digits"):
        first, whole = map(float, re.search(rf"{point} +this checkout +([\d.]+) / +([\d.]+)", out).groups())
        assert 0 < first < whole, out


@pytest.mark.slow
def test_the_pack_benchmark_reports_each_figure(capsys):
    """bench/pack_bench.py --quick: the step section for both models and K = 1, 4, and the heap line."""
    import re

    from bench.pack_bench import main

    main(["--quick"])
    out = capsys.readouterr().out
    for model in ("mlp", "cnn"):
        for k in (1, 4):
            assert re.search(rf"^  {model} +{k} +[0-9.]+ +[0-9.]+ +[0-9.]+x$", out, re.M), out
    assert re.search(r"^heap: a digits pack of 6 runs of 20 steps: .*: [0-9.]+x$", out, re.M), out


def test_authors_adam_is_their_update_with_eps_inside_the_root():
    """Their MyAdam (eps inside the root, bias correction), in float64 by hand, for three steps."""
    torch.manual_seed(0)
    p = torch.randn(7, dtype=torch.float64, requires_grad=True)
    opt = authors.AuthorsAdam([p], lr=0.1, betas=(0.8, 0.95), eps=1e-3)
    theta, m, v = p.detach().numpy().copy(), np.zeros(7), np.zeros(7)
    for n in range(1, 4):
        g = np.cos(np.arange(7.0) * n)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g * g
        theta = theta - 0.1 / (1 - 0.8 ** n) * m / np.sqrt(v / (1 - 0.95 ** n) + 1e-3)
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-14)


def test_authors_loaders_follow_their_script():
    """persistent workers, their batch size and prefetching, and their transform order: Resize,
    then (with augmentation) flip before crop, then ToTensor and Normalize with numpy's std."""
    from torchvision import transforms as T

    hwc = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    y = np.arange(40) % 10
    tl, sl = authors.loaders(hwc, y, hwc, y, augment=True, workers=2, pin_memory=False)
    for loader, shuffled in ((tl, True), (sl, False)):
        assert loader.persistent_workers and loader.prefetch_factor == 8 and loader.num_workers == 2
        assert loader.batch_size == 500 and isinstance(loader.sampler, torch.utils.data.RandomSampler) == shuffled
    kinds = [type(t) for t in tl.dataset.transform.transforms]
    assert kinds == [T.Resize, T.RandomHorizontalFlip, T.RandomCrop, T.ToTensor, T.Normalize]
    assert [type(t) for t in sl.dataset.transform.transforms] == [T.Resize, T.ToTensor, T.Normalize]
    norm = tl.dataset.transform.transforms[-1]
    x = hwc.astype(np.float64) / 255
    np.testing.assert_allclose(norm.std, x.reshape(-1, 3).std(0), rtol=1e-6)  # divisor n
    plain = authors.loaders(hwc, y, hwc, y, augment=False, workers=0, pin_memory=False)[0]
    assert [type(t) for t in plain.dataset.transform.transforms] == [T.Resize, T.ToTensor, T.Normalize]


@pytest.mark.slow
def test_the_sharpness_benchmark_reports_a_record_in_training_steps(capsys):
    """bench/sharpness_bench.py on the small CNN: a real run with records, one
    line with the record's cost in steps and its products (values are measurements, not asserted)."""
    import re

    from bench.sharpness_bench import main

    main(["--cases", "cnn"])
    out = capsys.readouterr().out
    m = re.search(r"^cnn +a record = +([\d.]+) steps \( *([\d.]+) products; median of 12 warm records", out, re.M)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) >= 2, out

"""ban.inference: the folded weight norm, each precision against fp32, the `auto` chooser, and
`--precision` on `ban predict` / `ban visualize`."""

import json
import threading

import pytest
import torch
from torch import nn

import ban
from ban import inference
from ban.inference import choose_precision, fold_weight_norm, inference_model
from ban.layers import WeightNormLinear
from ban.model import BANConfig

# Largest |logit - fp32 logit| allowed, relative to the largest |fp32 logit|, on the small random
# model below (measured: bf16 ~0.01, int8 ~0.02).
TOLERANCE = {"fp32": 0.0, "bf16": 0.05, "int8": 0.08}


def _model(**overrides) -> nn.Module:
    values = dict(vocab_size=40, embedding_dim=16, tfidf_embedding=True, hidden=64, glimpses=3,
                  num_answers=25, visual_dim=48, counter=True)  # fmt: skip
    torch.manual_seed(0)
    return ban.BAN(BANConfig(**{**values, **overrides})).eval()


def _batch(config, batch=4, boxes=12, tokens=10):
    torch.manual_seed(1)
    v = torch.rand(batch, boxes, config.visual_dim)
    v[0, 10:] = 0  # padded boxes
    corners = torch.rand(batch, boxes, 2) * 0.5
    b = torch.cat([corners, corners + 0.3, torch.full((batch, boxes, 2), 0.3)], dim=2)
    q = torch.randint(0, config.vocab_size, (batch, tokens))
    q[0, 6:] = config.vocab_size
    return v, b, q


@pytest.mark.parametrize("counter", [True, False])
def test_folded_weight_norm_equals_the_model_in_fp32(counter):
    model = _model(counter=counter)
    v, b, q = _batch(model.config)
    trainable = [p.requires_grad for p in model.parameters()]
    folded = fold_weight_norm(model)
    assert not any(isinstance(m, WeightNormLinear) for m in folded.modules())
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == sum(isinstance(m, WeightNormLinear) for m in model.modules()) > 0
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    with torch.no_grad():
        ref, out = model(v, b, q), folded(v, b, q)
        # the folded weight is g v / ||v||_F itself
        assert torch.equal(folded.classifier.output.weight, model.classifier.output.weight)
    for name in ("logits", "attention", "attention_logits"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-6)
    # the model itself is left as it was
    assert isinstance(model.classifier.output, WeightNormLinear)
    assert [p.requires_grad for p in model.parameters()] == trainable


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_each_precision_is_close_to_fp32(precision):
    model = _model()
    v, b, q = _batch(model.config)
    fast = inference_model(model, precision)
    assert fast.precision == precision and fast.config == model.config
    with torch.no_grad():
        ref, out = model(v, b, q), fast(v, b, q)
    assert out.logits.dtype == torch.float32 and out.attention.dtype == torch.float32
    diff = (out.logits - ref.logits).abs().max().item()
    scale = ref.logits.abs().max().item()
    assert scale > 0.1  # not a degenerate model
    assert diff <= TOLERANCE[precision] * scale + 1e-6, (precision, diff, scale)
    # each map is still a distribution over boxes x tokens, zero on the padded boxes
    torch.testing.assert_close(out.attention.sum(dim=(2, 3)), torch.ones(4, 3), atol=1e-3, rtol=0)
    assert out.attention[0, :, 10:].abs().max() == 0
    # the top answers agree with fp32 where fp32 is not close to a tie
    top2 = ref.logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * TOLERANCE[precision] * scale + 1e-6
    assert torch.equal(out.logits.argmax(1)[clear], ref.logits.argmax(1)[clear])


def test_weights_are_kept_in_the_inference_dtype():
    model = _model()
    bf16 = inference_model(model, "bf16").model
    assert bf16.classifier.output.weight.dtype == torch.bfloat16
    assert bf16.question_encoder.weight_hh_l0.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.counter.parameters())  # the counter: fp32
    int8 = inference_model(model, "int8").model
    assert type(int8.classifier.output).__name__ == "Linear"
    assert int8.classifier.output.__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert int8.question_encoder.__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert int8.classifier.output.weight().dtype == torch.qint8
    assert int8.classifier.output.weight().qscheme() == torch.per_channel_affine
    assert next(model.parameters()).dtype == torch.float32  # the model is not converted


def _rows_computed(fast) -> list[int]:
    """Record the rows each call of the attention's visual layer computes."""
    rows = []
    layer = fast.model.attention.v_net.layer
    layer.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    return rows


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_image_cache_answers_as_the_model_computing_each_image_once(precision):
    model = _model()
    v, b, q = _batch(model.config)
    v[2] = v[0]  # rows 0 and 2 ask about the same image
    fast = inference_model(model, precision, image_cache_bytes=2**30)
    cache, rows = fast.image_cache, _rows_computed(fast)
    assert cache is not None and cache.layers == 1 + model.config.glimpses
    with torch.no_grad():
        plain = fast(v, b, q)  # no keys: the model as it is, nothing kept
        assert rows == [4] and len(cache) == 0
        first = fast(v, b, q, image_keys=[10, 11, 10, 12])
        assert rows == [4, 3] and len(cache) == 3 and (cache.hits, cache.misses) == (0, 3)
        # all kept: other questions about them compute no visual projection
        again = fast(v[[3, 1, 0]], b[[3, 1, 0]], q[[0, 1, 2]], image_keys=[12, 11, 10])
        assert rows == [4, 3] and (cache.hits, cache.misses) == (3, 3)
        mixed = fast(v[[1, 3]], b[[1, 3]], q[[1, 3]], image_keys=[11, 99])  # one new image
        assert rows == [4, 3, 1] and len(cache) == 4
    tolerance = {"fp32": 1e-5, "bf16": 0.05, "int8": 0.05}[precision] * plain.logits.abs().max()
    for out, index in ((first, [0, 1, 2, 3]), (again, [3, 1, 0]), (mixed, [1, 3])):
        reference = fast(v[index], b[index], q[[0, 1, 2]] if out is again else q[index])
        assert (out.logits - reference.logits).abs().max() <= tolerance
        assert (out.attention - reference.attention).abs().max() <= 0.05
    if precision == "fp32":
        torch.testing.assert_close(first.logits, plain.logits, rtol=0, atol=1e-5)
    per_image = 12 * (3 * 64 + 3 * 64) * {"fp32": 4, "bf16": 2, "int8": 4}[precision]
    assert cache.bytes == 4 * per_image  # rank-3 attention layer + 3 glimpses of H 64, 12 boxes


def test_image_cache_keeps_the_most_recent_images_within_its_bytes():
    model = _model()
    v, b, q = _batch(model.config)
    per_image = 12 * (3 * 64 + 3 * 64) * 4
    fast = inference_model(model, "fp32", image_cache_bytes=2 * per_image)
    cache, rows = fast.image_cache, _rows_computed(fast)
    with torch.no_grad():
        for key in (1, 2, 1, 3):  # image 1 asked again before image 3: image 2 is the oldest
            fast(v[key : key + 1], b[:1], q[:1], image_keys=[key])
        assert rows == [1, 1, 1] and len(cache) == 2 and cache.bytes == 2 * per_image
        fast(v[2:3], b[:1], q[:1], image_keys=[2])  # dropped: computed again
        assert rows == [1, 1, 1, 1]
        # the same image padded to another box count is another entry, computed for it
        padded = torch.cat([v[1:2], torch.zeros(1, 4, v.shape[2])], dim=1)
        boxes = torch.cat([b[:1], torch.zeros(1, 4, b.shape[2])], dim=1)
        out = fast(padded, boxes, q[:1], image_keys=[1])
        assert rows[-1] == 1
        torch.testing.assert_close(out.logits, fast(padded, boxes, q[:1]).logits, rtol=0, atol=1e-5)
        cache.forget(1)
        fast(padded, boxes, q[:1], image_keys=[1])
        assert rows[-1] == 1 and len(rows) == 7
        cache.clear()
        assert len(cache) == 0 and cache.bytes == 0
        with pytest.raises(ValueError, match="2 image keys for a batch of 1 rows"):
            fast(v[:1], b[:1], q[:1], image_keys=[1, 2])
    # a keyed forward's keys are its thread's: a forward without keys elsewhere runs as it is
    cache.begin([1], 12)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cache.keys))
    thread.start()
    thread.join()
    assert seen == [None] and cache.keys == [(1, 12)]
    cache.end()
    assert cache.keys is None
    with pytest.raises(ValueError, match="max_bytes > 0"):
        inference.ImageCache(0, layers=1)
    assert inference_model(model, "fp32").image_cache is None  # off unless asked for


def test_auto_chooses_by_cpu_flags_and_size(monkeypatch):
    big = inference.SMALL_MODEL_PARAMETERS
    assert choose_precision("cpu", {"avx2", "avx512f", "avx512_bf16"}, big) == "bf16"
    assert choose_precision("cpu", {"avx2", "amx_bf16", "amx_tile"}, big) == "bf16"
    assert choose_precision("cpu", {"avx2", "avx512f", "avx512_vnni"}, big) == "int8"
    assert choose_precision("cpu", {"avx2", "avx512_bf16"}, big - 1) == "fp32"  # small model
    monkeypatch.setattr(inference, "int8_supported", lambda: False)
    assert choose_precision("cpu", {"avx2"}, big) == "fp32"
    assert choose_precision("cpu", {"avx512_bf16"}, big) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("cuda", set(), big) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("cuda", set(), big) == "fp32"


def test_auto_on_a_small_model_is_fp32_and_exact():
    model = _model()
    fast = inference_model(model, "auto")
    assert fast.precision == "fp32"
    v, b, q = _batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(fast(v, b, q).logits, model(v, b, q).logits, rtol=0, atol=1e-6)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert inference.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert inference.cpu_flags(tmp_path / "missing") == set()


def test_unknown_precision_and_int8_off_the_cpu_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; expected one of auto, fp32"):
        inference_model(model, "fp16")
    with pytest.raises(ValueError, match="'int8' runs on the CPU only"):
        inference_model(model, "int8", device="cuda")
    fast = inference_model(model, "fp32")
    assert not fast.training and not fast.model.training
    with pytest.raises(ValueError, match="cannot be put in training mode"):
        fast.train()
    assert not fast.eval().model.training


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.viz_run import tiny_viz_run

    return tiny_viz_run(tmp_path_factory)


def test_precision_flag_end_to_end(run, tmp_path, capsys):
    from ban.cli import main
    from ban.predict import Predictor
    from tests.viz_run import first_question

    run_dir, data = run
    entry = first_question(data)
    ask = ["predict", str(run_dir), "--image-id", str(entry["image_id"]),
           "--question", entry["question"], "--top-k", "3", "--json"]  # fmt: skip
    answers = {}
    for precision in ("fp32", "bf16", "int8"):
        assert main([*ask, "--precision", precision]) == 0
        answers[precision] = json.loads(capsys.readouterr().out)["answers"]
    fp32 = {a["answer"]: a["score"] for a in answers["fp32"]}
    for precision, tolerance in (("bf16", 0.02), ("int8", 0.02)):
        for a in answers[precision]:  # sigmoid scores of the same answers, close to fp32's
            if a["answer"] in fp32:
                assert abs(a["score"] - fp32[a["answer"]]) <= tolerance, (precision, a)
    # the library answers as the command does
    predictor = Predictor.from_checkpoint(run_dir / "last.safetensors", data=data, precision="int8")
    assert predictor.precision == "int8"
    again = predictor(entry["question"], entry["image_id"], top_k=3)
    assert [(a, s) for a, s in again.answers] == [
        (a["answer"], a["score"]) for a in answers["int8"]
    ]

    pytest.importorskip("matplotlib")
    out = tmp_path / "a.png"
    assert main(["visualize", str(run_dir), "--image-id", str(entry["image_id"]), "--question",
                 entry["question"], "--out", str(out), "--precision", "int8"]) == 0  # fmt: skip
    assert out.stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*ask, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        Predictor.from_checkpoint(run_dir / "last.safetensors", data=data, precision="half")


def test_benchmark_script_writes_its_table(tmp_path):
    from tests.benchmark_scripts import load

    out = tmp_path / "modes.txt"
    out.write_text("an earlier run\n")
    load("inference_modes").main(["--quick", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("an earlier run\n")  # was: overwritten, the recorded runs lost
    assert "CPU: " in text and "auto picks " in text and "load average" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    rows = [row for row in rows if row[0].strip() not in ("mode", "---")]  # the values
    speed, kept = rows[:4], rows[4:]
    assert [row[0].strip() for row in speed] == ["model", "fp32", "bf16", "int8"]  # one thread
    for row in speed:
        assert float(row[3]) > 0 and float(row[5]) > 0  # median ms, CPU ms
    assert float(speed[1][7]) == 0.0  # fp32 folded: the same logits as the model
    # an image asked about again: each precision at batch 1 and 16, the same logits as computed
    assert [(row[0].strip(), row[1].strip()) for row in kept] == [
        (mode, batch) for batch in ("1", "16") for mode in ("fp32", "bf16", "int8")
    ]
    assert all(float(row[3]) > 0 and float(row[6]) == 0.0 for row in kept)

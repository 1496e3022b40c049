"""python -m kdfused.store on a tiny causal LM saved with save_pretrained (and
its tokenizer; nothing downloaded): build from a text file, a jsonl and a
datasets directory; --top-p; inspect; verify and a flipped byte; a build
killed with SIGKILL and run again equals an uninterrupted one; the windows it
writes feed kdfused.hf.DistillationTrainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the store CLI's build needs transformers ([hf])")
datasets = pytest.importorskip("datasets", reason="the store CLI writes a datasets directory")
pytest.importorskip("safetensors", reason="the store needs safetensors ([store])")

import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from kdfused import ops, sparse  # noqa: E402
from kdfused import store as cli  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="needs kdfused's CPU kernel")
ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(150)]


def documents(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(m),), generator=g))
        for m in torch.randint(3, 25, (n,), generator=g)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Llama teacher and a word-level tokenizer, saved as a user would."""
    where = tmp_path_factory.mktemp("teacher")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    fast.save_pretrained(where)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # a confident teacher, as a trained one is: top-p rows differ in length
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(where)
    return where


def write_data(where: Path, kind: str, docs) -> Path:
    if kind == "txt":
        path = where / "docs.txt"
        path.write_text("\n".join(docs) + "\n")
    elif kind == "jsonl":
        path = where / "docs.jsonl"
        path.write_text(
            "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
        )
    else:
        path = where / "docs"
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    return path


def build_args(model_dir, data, out, shard_rows=40):
    args = ["build", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    return args + [
        "--k",
        "8",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--shard-rows",
        str(shard_rows),
        "--quiet",
    ]


def build(model_dir, data, out, *extra, shard_rows=40):
    return cli.main(build_args(model_dir, data, out, shard_rows) + list(extra))


def shard_tensors(path: Path):
    from safetensors import safe_open

    index = json.loads((path / "index.json").read_text())
    out = []
    for name, _ in index["shards"]:
        with safe_open(str(path / name), "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != "store_id"}
            out.append((name, meta, {k: f.get_tensor(k) for k in f.keys()}))
    return out


@pytest.mark.parametrize("kind", ["txt", "jsonl", "datasets"])
def test_build_from_each_kind_of_data(tmp_path, model_dir, kind):
    """The three inputs give the same windows and the same store; the store's
    rows are the teacher's top-k at every window position."""
    docs = documents()
    out = tmp_path / "store"
    assert build(model_dir, write_data(tmp_path, kind, docs), out) == 0
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    windows = cli.token_windows(tok, docs, 16)
    store = sparse.SparseStore(out)
    assert len(store) == len(windows) * 15
    table = datasets.load_from_disk(str(out / "windows"))
    assert table["store_start"] == [i * 15 for i in range(len(windows))]
    assert torch.equal(torch.tensor(table["input_ids"]), windows)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=windows[:3, :-1]).logits.flatten(0, 1)
    want = sparse.topk(logits, 8)
    got = store[0:45].padded(8)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.logprobs.float(), want.logprobs, atol=2e-3, rtol=1e-3)


def test_top_p_inspect_and_verify(tmp_path, model_dir, capsys):
    data = write_data(tmp_path, "txt", documents())
    build(model_dir, data, tmp_path / "k8")
    build(model_dir, data, tmp_path / "p", "--top-p", "0.5")
    capsys.readouterr()
    sizes = {}
    for name in ("k8", "p"):
        assert cli.main(["inspect", str(tmp_path / name)]) == 0
        info = json.loads(capsys.readouterr().out)
        sizes[name] = info
        assert info["version"] == 3 and info["id_bytes"] == 2 and info["k"] == 8
        assert info["build"]["seq_len"] == 16
    assert sizes["k8"]["ids_per_row"] == 8
    assert 1 <= sizes["p"]["ids_per_row"] < 8
    assert sizes["p"]["bytes_per_row"] < sizes["k8"]["bytes_per_row"]
    # 2-byte ids, float16 log-probs, a 2-byte length a row (and a header a shard).
    header = sizes["k8"]["shard_bytes"] - sizes["k8"]["rows"] * (8 * 4 + 2)
    assert 0 < header < 2000 * sizes["k8"]["shards"]
    assert cli.main(["verify", str(tmp_path / "p")]) == 0
    assert "verified" in capsys.readouterr().out
    shard = tmp_path / "p" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(tmp_path / "p")]) == 1
    assert "shard-00001.safetensors" in capsys.readouterr().err


def test_bad_arguments(tmp_path, model_dir):
    data = write_data(tmp_path, "txt", documents(3))
    with pytest.raises(ValueError, match="fewer than one window of 4096"):
        cli.main(
            [
                "build",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "s"),
                "--k",
                "4",
                "--seq-len",
                "4096",
                "--quiet",
            ]
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no string 'text' field"):
        list(cli.read_documents(bad))
    with pytest.raises(FileNotFoundError):
        list(cli.read_documents(tmp_path / "missing.txt"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit, match="exists and is not an unfinished build"):
        build(model_dir, data, tmp_path / "full")


def test_killed_build_resumes_to_the_same_store(tmp_path, model_dir):
    """SIGKILL after the first shard; the same command again finishes the
    store, and it equals a build run in one go, tensor for tensor."""
    data = write_data(tmp_path, "txt", documents(600, seed=4))
    whole = tmp_path / "whole"
    assert build(model_dir, data, whole) == 0
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "kdfused.store",
        "build",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--k",
        "8",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--shard-rows",
        "40",
        "--quiet",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    journal = out / "journal.json"
    while time.monotonic() < deadline:
        if journal.exists():
            with_rows = json.loads(journal.read_text() or "{}").get("rows", 0)
            if with_rows >= 150:
                break
        if child.poll() is not None:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists(), "the build finished before it was killed"
    assert subprocess.run(command, env=env, timeout=300).returncode == 0
    got, want = shard_tensors(out), shard_tensors(whole)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (name, meta_g, tensors_g), (_, meta_w, tensors_w) in zip(got, want, strict=True):
        assert meta_g == meta_w, name
        for key, value in tensors_w.items():
            assert torch.equal(tensors_g[key], value), (name, key)


def test_windows_train_the_hf_trainer(tmp_path, model_dir):
    """The store and its windows, as the build wrote them, are what
    kdfused.hf.DistillationTrainer reads."""
    import kdfused
    import kdfused.hf as khf

    data = write_data(tmp_path, "txt", documents())
    out = tmp_path / "store"
    build(model_dir, data, out, "--top-p", "0.9")
    store = sparse.SparseStore(out)
    table = datasets.load_from_disk(str(out / "windows"))
    torch.manual_seed(1)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    student = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **{**teacher.config.to_dict(), "hidden_size": 16, "intermediate_size": 32}
        )
    )
    args = transformers.TrainingArguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    loss = kdfused.FusedLinearDistillLoss(temperature=1.0)
    trainer = khf.DistillationTrainer(student, store, loss, args=args, train_dataset=table)
    assert trainer.train().global_step == 2
